"""Private PostgreSQL / Redis / moto / gunicorn instances for tests that stop or break a service.

A test that kills a dependency must never touch the shared ones (the machine's
Redis on 6379, PostgreSQL on 5432, the moto `make test` started): it starts its
own on a free port with scripts/devstack.py's helpers and stops it by PID.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

import devstack  # noqa: E402

BIN = Path(sys.executable).parent
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REGION = "us-east-1"
CREDS = dict(devstack.STATIC_TEST_CREDENTIALS)


class PrivateRedis:
    """A throwaway redis-server (no persistence) that a test may stop and start again.

    `restart()` reuses the port, so clients configured with `url` reconnect to an
    empty server, like a real Redis restarted without its data.
    """

    def __init__(self, log_dir: Path, port: int | None = None):
        self.port = port or devstack.free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_dir = Path(log_dir)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> "PrivateRedis":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = devstack.start_process(
            [REDIS_SERVER, "--port", self.port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.log_dir, "--daemonize", "no"],
            log_path=self.log_dir / f"redis-{self.port}.log",
        )
        deadline = time.monotonic() + timeout
        while devstack._redis_probe(self.url) is not None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private redis-server on {self.port} did not come up")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGTERM by PID (its own process group), wait until the port is closed."""
        if self.proc is not None and self.proc.poll() is None:
            devstack.stop_process(self.proc)
        deadline = time.monotonic() + 10
        while devstack.port_open("127.0.0.1", self.port, timeout=0.2):
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.port} still open after stopping redis-server")
            time.sleep(0.05)

    def restart(self) -> "PrivateRedis":
        self.stop()
        return self.start()


class PrivateMoto:
    """A throwaway `moto_server` holding one SQS queue, for a test to stop."""

    def __init__(self, log_dir: Path, port: int | None = None):
        self.port = port or devstack.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = Path(log_dir)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "PrivateMoto":
        self.proc = devstack.start_process(
            [BIN / "moto_server", "-H", "127.0.0.1", "-p", self.port],
            log_path=self.log_dir / f"moto-{self.port}.log",
        )
        deadline = time.monotonic() + timeout
        while not devstack.http_answers(self.url, timeout=1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private moto_server on {self.port} did not come up")
        return self

    def kill(self) -> None:
        """SIGKILL by PID, as the chaos runner restarts moto: no goodbye to open connections."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: the port still accepts connections (kernel backlog), nothing answers."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.thaw()  # a stopped process would only take SIGTERM once continued
        if self.proc is not None and self.proc.poll() is None:
            devstack.stop_process(self.proc)
        deadline = time.monotonic() + 10
        while devstack.port_open("127.0.0.1", self.port, timeout=0.2):
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.port} still open after stopping moto_server")
            time.sleep(0.05)

    def sqs(self):
        import boto3

        return boto3.client("sqs", region_name=REGION, endpoint_url=self.url, **CREDS)

    def create_queue(self, name: str) -> str:
        return self.sqs().create_queue(QueueName=name)["QueueUrl"]

    def depth(self, queue_url: str) -> int:
        attrs = self.sqs().get_queue_attributes(
            QueueUrl=queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


class PrivatePostgres:
    """A PostgreSQL cluster of its own (initdb in a fresh directory, a free port),
    migrated and seeded; stop / start / freeze (SIGSTOP, a hung server) / thaw."""

    def __init__(self):
        import tempfile

        self.as_pg = devstack._pg_user_kwargs()
        self.bindir = devstack._pg_bindir()
        # Not under pytest's tmp_path: the postgres user must reach the directory.
        self.home = Path(tempfile.mkdtemp(prefix="dpp-test-pg-"))
        os.chmod(self.home, 0o755)
        if self.as_pg:
            os.chown(self.home, self.as_pg["user"], self.as_pg["group"])
        self.port = devstack.free_port()
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/dpp"

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bindir / "pg_ctl"), "-D", str(self.home / "data"),
                               "-l", str(self.home / "postgres.log"), *args],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=self.home,
                              start_new_session=True, **self.as_pg)

    def create(self) -> "PrivatePostgres":
        result = subprocess.run([str(self.bindir / "initdb"), "-D", str(self.home / "data"), "-U", "postgres",
                                 "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
                                capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=self.home, **self.as_pg)
        assert result.returncode == 0, result.stderr
        self.start()
        devstack._pg_ensure_database(self.url, fresh=True)
        env = {**os.environ, "DATABASE_URL": self.url, "DATABASE_URL_MIGRATIONS": self.url, "PYTHONPATH": str(ROOT)}
        migrated = subprocess.run([str(BIN / "alembic"), "upgrade", "head"], cwd=ROOT, env=env,
                                  capture_output=True, text=True)
        assert migrated.returncode == 0, migrated.stderr
        return self

    def start(self) -> None:
        result = self._pg_ctl("-w", "-t", "60", "-o", f"-p {self.port} -k {self.home} -c listen_addresses=127.0.0.1",
                              "start")
        assert result.returncode == 0, result.stderr + (self.home / "postgres.log").read_text()

    def stop(self) -> None:
        self._pg_ctl("-m", "immediate", "-w", "-t", "30", "stop")

    def _pids(self) -> list[int]:
        postmaster = int((self.home / "data" / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        return [postmaster, *map(int, children)]

    def freeze(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGCONT)

    def remove(self) -> None:
        if (self.home / "data" / "postmaster.pid").exists():
            try:
                self.thaw()
            except (OSError, ValueError):
                pass
            self.stop()
        shutil.rmtree(self.home, ignore_errors=True)


@contextmanager
def private_postgres():
    pg = PrivatePostgres().create()
    try:
        yield pg
    finally:
        pg.remove()


@contextmanager
def private_redis(log_dir: Path):
    redis = PrivateRedis(log_dir).start()
    try:
        yield redis
    finally:
        redis.stop()


@contextmanager
def private_moto(log_dir: Path):
    moto = PrivateMoto(log_dir).start()
    try:
        yield moto
    finally:
        moto.stop()


@contextmanager
def gunicorn(env_overrides: dict, log_path: Path, workers: int = 1, extra_args: tuple = ()):
    """The API on a free port, env = os.environ + overrides; yields its base URL; stopped by PID.

    Like the Dockerfile and the chart: sync workers, gunicorn's default 30 s worker timeout.
    """
    port = devstack.free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_overrides}
    proc = devstack.start_process(
        [BIN / "gunicorn", "-b", f"127.0.0.1:{port}", "-w", str(workers), *extra_args, "dpp.api:create_app()"],
        env=env, log_path=log_path,
    )
    try:
        devstack.wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        devstack.stop_process(proc)
