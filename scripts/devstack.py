#!/usr/bin/env python3
"""Local platform orchestrator: PostgreSQL, Redis, moto and the DPP processes.

    devstack.py services [--test]   make PostgreSQL, Redis and moto answer; print `export` lines
    devstack.py migrate  [--test]   services, then `alembic upgrade head` and `dpp plans seed`
    devstack.py run                 services + migrate, then API, worker, beat and Flower (each restarted if it dies)
    devstack.py test [pytest args]  fresh test database/Redis DB/queue/bucket, then pytest
    devstack.py aws                 only create the queues and the bucket (docker-compose init)
    devstack.py stop                stop the private PostgreSQL/Redis/moto recorded in .local/

Services already answering (the machine's PostgreSQL on 5432, Redis on 6379, an
SQS_ENDPOINT_URL) are used as they are and never stopped. Only when nothing answers does
devstack start a private instance, with all its state under `.local/`; `run` and `test`
stop the private instances they started themselves, `services` and `migrate` leave them
running for later commands (which reuse them through the pid/port files), `stop` ends them.

Progress goes to stderr; stdout of `services` is only `export NAME=value` lines, so
`eval "$(.venv/bin/python scripts/devstack.py services)"` sets up a shell.

Only the standard library at import time (`stop` and `--help` work without the venv);
boto3 and psycopg2 are imported when needed. The helpers `free_port`, `port_open`,
`wait_http`, `http_answers`, `start_process` and `stop_process` are public for tests
that start real gunicorn/celery processes.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / ".local"
VENV_BIN = ROOT / ".venv" / "bin"

# The same names and defaults as dpp/config.py.
DEFAULT_DATABASE_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/dpp"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_AWS_REGION = "us-east-1"
DEFAULT_QUEUE_NAME = "dpp-runs"
DEFAULT_BUCKET = "dpp-results"
DEFAULT_FLOWER_BASIC_AUTH = "admin:dpp-dev"

# `make test` names: never the development database, Redis DB, queue or bucket.
# Overridable so that two test runs on one machine (two checkouts, or CI beside
# a developer) do not drop each other's database or drain each other's queue.
TEST_DATABASE = os.environ.get("DPP_TEST_DATABASE", "dpp_test")
TEST_REDIS_DB = int(os.environ.get("DPP_TEST_REDIS_DB", "15"))
TEST_QUEUE_NAME = os.environ.get("DPP_TEST_QUEUE", "dpp-test-runs")
TEST_BUCKET = os.environ.get("DPP_TEST_BUCKET", "dpp-test-results")

# SQS: the visibility timeout matches celeryconfig (2 × the default lease); a message
# received this many times without being acknowledged moves to the dead-letter queue.
QUEUE_VISIBILITY_TIMEOUT = "120"
DLQ_MAX_RECEIVE_COUNT = "3"

MOTO_PREFERRED_PORT = 5010
STATIC_TEST_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
STOP_TIMEOUT_SEC = 10.0


class DevstackError(Exception):
    """A problem to report in one line, without a traceback."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM received: unwind through every `finally` and stop what we started."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Public helpers (also used by tests)
# --------------------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it; tiny race by nature)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports: every socket stays bound until all are picked,
    since the OS may hand out a just-released port again."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# Loopback checks must not be routed through an HTTP proxy from the environment.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def wait_http(url: str, timeout: float = 30.0, status: int | None = None) -> int:
    """Poll `url` (GET) until it answers; return the HTTP status it answered with.

    With `status=None` any status below 500 counts (the server is up; a 503 from a
    readiness endpoint still starting does not); with a status, only that one does.
    Raises TimeoutError, naming the last answer or error, after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            with _NO_PROXY_OPENER.open(url, timeout=max(0.2, min(2.0, remaining))) as resp:
                code, last = resp.status, f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            code, last = exc.code, f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            code, last = None, str(getattr(exc, "reason", exc))
        if code is not None and (code == status if status is not None else code < 500):
            return code
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url} did not answer{f' {status}' if status else ''} "
                               f"within {timeout:g} s (last: {last})")
        time.sleep(0.2)


def http_answers(url: str, timeout: float = 3.0, status: int | None = None) -> bool:
    """`wait_http` as a yes/no question."""
    try:
        wait_http(url, timeout, status)
    except TimeoutError:
        return False
    return True


def start_process(args, env: dict | None = None, log_path: str | os.PathLike | None = None,
                  cwd: str | os.PathLike | None = None) -> subprocess.Popen:
    """Start `args` in its own session (so its own process group, pgid == pid).

    Its own group means a terminal's Ctrl-C does not reach it and `stop_process` can
    end it together with its children (gunicorn workers, celery pool processes).
    Output: appended to `log_path` if given, else a pipe (`proc.stdout`, stderr merged)
    for the caller to read. stdin is /dev/null. cwd defaults to the repository root.
    """
    args = [str(a) for a in args]
    if log_path is not None:
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            return subprocess.Popen(args, env=env, cwd=cwd or ROOT, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return subprocess.Popen(args, env=env, cwd=cwd or ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_SEC) -> int | None:
    """SIGTERM the process group of a `start_process` child, SIGKILL it after `timeout`.

    Returns the child's exit status. Waits for the whole group, not just the leader, so
    no orphaned worker process survives.
    """
    return stop_processes([proc], timeout)[0]


def stop_processes(procs: list, timeout: float = STOP_TIMEOUT_SEC) -> list:
    """`stop_process` for several children at once: TERM all, one shared deadline, KILL."""
    for proc in procs:
        _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None or _group_alive(proc.pid):
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    return [proc.returncode for proc in procs]


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # Zombies still count for kill(0); look for a member that is really running.
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat and stat[1] != "Z" and stat[3] == pgid:
                return True
    return False


def _proc_stat(pid: int) -> tuple | None:
    """(pid, state, ppid, pgid) from /proc/<pid>/stat, or None when gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return pid, fields[0], int(fields[1]), int(fields[2])


def _pid_running(pid: int, needle: str) -> bool:
    """True when `pid` is alive (not a zombie) and its command line contains `needle`.

    Guards against a recycled PID in a stale pid file: we only ever signal our own.
    """
    stat = _proc_stat(pid)
    if stat is None or stat[1] == "Z":
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return needle in cmdline


def _stop_pid(pid: int, timeout: float = STOP_TIMEOUT_SEC) -> None:
    """Stop a recorded process that is not our child (started by an earlier invocation)."""
    stat = _proc_stat(pid)
    own_group = stat is not None and stat[3] == pid
    kill = os.killpg if own_group else os.kill
    with contextlib.suppress(ProcessLookupError, PermissionError):
        kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stat = _proc_stat(pid)
        if stat is None or stat[1] == "Z":
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------

def is_loopback_url(url: str | None) -> bool:
    """Same rule as dpp.config: the parsed host is localhost or a loopback address."""
    host = urlsplit(url).hostname if url else None
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tool(name: str) -> str:
    """Path of a console script: the venv's first, then PATH."""
    candidate = VENV_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise DevstackError(f"`{name}` not found in .venv/bin or PATH — run `make venv`")
    return found


def venv_python() -> str:
    candidate = VENV_BIN / "python"
    return str(candidate) if candidate.exists() else sys.executable


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _replace_url(url: str, *, netloc: str | None = None, path: str | None = None) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(
        netloc=parts.netloc if netloc is None else netloc,
        path=parts.path if path is None else path,
    ))


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@contextlib.contextmanager
def _state_lock():
    """Serialize bring-up between concurrent invocations (two terminals, make -j)."""
    import fcntl

    LOCAL.mkdir(parents=True, exist_ok=True)
    with open(LOCAL / "devstack.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _apt_install(*packages: str) -> None:
    """Install Debian packages (CI on a fresh machine with no shared services)."""
    hint = f"apt-get install -y {' '.join(packages)}"
    if os.geteuid() != 0:
        raise DevstackError(f"{', '.join(packages)} missing and not root: run `sudo {hint}`")
    if not shutil.which("apt-get"):
        raise DevstackError(f"{', '.join(packages)} missing and no apt-get: install them by hand")
    say(f"… installing {' '.join(packages)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *packages]):
        # apt's chatter goes to stderr: stdout of `services` is for export lines only.
        if subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr).returncode != 0:
            raise DevstackError(f"`{' '.join(cmd)}` failed")


# --------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------

class PgError(Exception):
    pass


def _pg_params(url: str, dbname: str | None = None) -> dict:
    """libpq keyword parameters from a SQLAlchemy-style URL."""
    parts = urlsplit(url)
    params = {k: v for k, v in parse_qsl(parts.query)}
    if parts.hostname:
        params["host"] = parts.hostname
    if parts.port:
        params["port"] = str(parts.port)
    if parts.username:
        params["user"] = unquote(parts.username)
    if parts.password:
        params["password"] = unquote(parts.password)
    params["dbname"] = dbname or unquote(parts.path.lstrip("/")) or "postgres"
    params.setdefault("connect_timeout", "5")
    return params


def _pg_query(url: str, sql: str, dbname: str = "postgres") -> list:
    """Run one statement in autocommit (CREATE/DROP DATABASE need it); rows if any.

    psycopg2 when importable (the venv), else the `psql` client.
    """
    params = _pg_params(url, dbname)
    try:
        import psycopg2
    except ImportError:
        psycopg2 = None
    if psycopg2 is not None:
        try:
            conn = psycopg2.connect(**params)
        except psycopg2.OperationalError as exc:
            raise PgError(str(exc).strip()) from None
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                try:
                    cur.execute(sql)
                except psycopg2.Error as exc:
                    raise PgError(str(exc).strip()) from None
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()
    psql = shutil.which("psql")
    if not psql:
        raise PgError("neither psycopg2 nor psql is available")
    conninfo = " ".join("{}='{}'".format(k, str(v).replace("\\", "\\\\").replace("'", "\\'"))
                        for k, v in params.items())
    result = subprocess.run([psql, conninfo, "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise PgError(result.stderr.strip())
    return [tuple(line.split("|")) for line in result.stdout.splitlines() if line]


def _pg_probe(url: str) -> str | None:
    """None when the server at `url` accepts us; "closed" when nothing listens; else the error."""
    parts = urlsplit(url)
    if parts.hostname and not port_open(parts.hostname, parts.port or 5432):
        return "closed"
    try:
        _pg_query(url, "SELECT 1")
    except PgError as exc:
        return str(exc) or "connection failed"
    return None


def _sql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _pg_database(url: str) -> str:
    return unquote(urlsplit(url).path.lstrip("/")) or "postgres"


def _pg_ensure_database(url: str, fresh: bool = False) -> None:
    name = _pg_database(url)
    try:
        if fresh:
            # FORCE (PostgreSQL ≥ 13) ends sessions a crashed test run left behind.
            _pg_query(url, f"DROP DATABASE IF EXISTS {_sql_ident(name)} WITH (FORCE)")
        exists = _pg_query(url, f"SELECT 1 FROM pg_database WHERE datname = {_sql_literal(name)}")
        if not exists:
            _pg_query(url, f"CREATE DATABASE {_sql_ident(name)}")
    except PgError as exc:
        raise DevstackError(f"could not prepare database {name}: {exc}") from None


def _pg_bindir() -> Path | None:
    """A directory holding both initdb and pg_ctl (PATH first, then the newest Debian version)."""
    candidates = []
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(os.path.realpath(found)).parent)
        candidates.append(Path(found).parent)
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                    key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parent.name.split(".")],
                    reverse=True)
    candidates.extend(debian)
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


def _pg_user_kwargs() -> dict:
    """subprocess kwargs that drop root to the `postgres` user (initdb/postgres refuse root)."""
    if os.geteuid() != 0:
        return {}
    import pwd

    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        say("… creating system user postgres (PostgreSQL refuses to run as root)")
        nologin = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--home-dir", "/var/lib/postgresql", "--shell", nologin, "postgres"],
                       check=True, stdout=sys.stderr)
        entry = pwd.getpwnam("postgres")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _pg_homes() -> list:
    """Where a private cluster may live: .local/pg, or a /tmp fallback when the postgres
    user cannot reach the work tree (e.g. a clone under a 0700 home directory)."""
    digest = hashlib.sha1(str(ROOT).encode()).hexdigest()[:10]
    return [LOCAL / "pg", Path(tempfile.gettempdir()) / f"dpp-devstack-{digest}" / "pg"]


def _pg_prepare_home(as_pg: dict) -> Path:
    for home in _pg_homes():
        home.parent.mkdir(parents=True, exist_ok=True)
        home.mkdir(mode=0o700, exist_ok=True)
        if not as_pg:
            return home
        os.chown(home, as_pg["user"], as_pg["group"])
        os.chmod(home.parent, 0o755)
        check = subprocess.run(["test", "-w", str(home), "-a", "-x", str(home)], **as_pg)
        if check.returncode == 0:
            return home
        say(f"  (user postgres cannot reach {home}; trying the next location)")
    raise DevstackError("no directory the postgres user can write for a private cluster")


def _pg_running_home(as_pg: dict) -> Path | None:
    for home in _pg_homes():
        pg_ctl_dir = _pg_bindir()
        if (home / "data" / "PG_VERSION").exists() and pg_ctl_dir:
            status = subprocess.run([str(pg_ctl_dir / "pg_ctl"), "-D", str(home / "data"), "status"],
                                    capture_output=True, stdin=subprocess.DEVNULL, **as_pg)
            if status.returncode == 0:
                return home
    return None


def _pg_private_url(port: int, template: str) -> str:
    return _replace_url(template, netloc=f"postgres@127.0.0.1:{port}")


def stop_private_postgres(home: Path | None = None) -> bool:
    """`pg_ctl stop -m fast` on our private cluster; True if one was running."""
    if not any((h / "data" / "PG_VERSION").exists() for h in ([home] if home else _pg_homes())):
        return False
    as_pg = _pg_user_kwargs()
    home = home or _pg_running_home(as_pg)
    bindir = _pg_bindir()
    if home is None or bindir is None:
        return False
    result = subprocess.run([str(bindir / "pg_ctl"), "-D", str(home / "data"), "-m", "fast", "-w", "-t", "30", "stop"],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, **as_pg)
    if result.returncode != 0:
        say(f"  pg_ctl stop failed: {result.stderr.strip() or result.stdout.strip()}")
        return False
    return True


# --------------------------------------------------------------------------------------
# Redis (a few RESP commands over a socket: no redis-py needed to check or flush)
# --------------------------------------------------------------------------------------

class RedisError(Exception):
    pass


def redis_command(url: str, *args, timeout: float = 3.0):
    """Send one command to the server and database in `url` (AUTH and SELECT as needed)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    sock = socket.create_connection((host, port), timeout=timeout)
    if parts.scheme == "rediss":
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
    with sock, sock.makefile("rwb") as stream:
        def call(*words):
            encoded = [str(w).encode() for w in words]
            stream.write(b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in encoded))
            stream.flush()
            return read()

        def read():
            line = stream.readline()
            if not line:
                raise RedisError("connection closed")
            kind, rest = line[:1], line[1:-2]
            if kind == b"+":
                return rest.decode()
            if kind == b"-":
                raise RedisError(rest.decode())
            if kind == b":":
                return int(rest)
            if kind == b"$":
                size = int(rest)
                return None if size < 0 else stream.read(size + 2)[:-2].decode(errors="replace")
            if kind == b"*":
                return [read() for _ in range(max(0, int(rest)))]
            raise RedisError(f"unexpected reply {line!r}")

        if parts.password:
            user = unquote(parts.username) if parts.username else None
            call("AUTH", *([user] if user else []), unquote(parts.password))
        db = parts.path.lstrip("/")
        if db and db != "0":
            call("SELECT", int(db))
        return call(*args)


def _redis_probe(url: str) -> str | None:
    """None when PING works; "closed" when nothing listens; else the error."""
    parts = urlsplit(url)
    if not port_open(parts.hostname or "127.0.0.1", parts.port or 6379):
        return "closed"
    try:
        redis_command(url, "PING")
    except (OSError, RedisError) as exc:
        return str(exc) or "connection failed"
    return None


# --------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------

class Stack:
    """Brings up PostgreSQL, Redis, moto and the AWS resources; remembers what it started.

    `env` holds the variables the platform's processes need (what `services` exports).
    `down()` stops only what THIS object started; shared services and private ones
    reused from an earlier invocation keep running.
    """

    def __init__(self, test: bool = False):
        self.test = test
        self.env: dict = {}
        self.started: list = []  # (label, stop callable), in start order
        self.private = False     # any private instance in use (started or reused)

    # -- public ------------------------------------------------------------------------

    def up(self) -> "Stack":
        try:
            with _state_lock():
                self._postgres()
                self._redis()
                self._moto()
            self._aws()
        except BaseException:
            self.down()
            raise
        self.env.setdefault("DPP_ENV", os.environ.get("DPP_ENV") or "development")
        self.env.setdefault("FLOWER_BASIC_AUTH", os.environ.get("FLOWER_BASIC_AUTH") or DEFAULT_FLOWER_BASIC_AUTH)
        return self

    def down(self) -> None:
        while self.started:
            label, stop = self.started.pop()
            try:
                stop()
                say(f"✓ stopped {label}")
            except Exception as exc:  # keep stopping the others
                say(f"✗ could not stop {label}: {exc}")

    def child_env(self, **extra: str) -> dict:
        """os.environ + the stack's variables + `extra`, with the venv first on PATH."""
        env = dict(os.environ)
        if env.get("DATABASE_URL_MIGRATIONS") and env.get("DATABASE_URL") != self.env.get("DATABASE_URL"):
            # It pointed at another database than the one we chose: migrate ours.
            del env["DATABASE_URL_MIGRATIONS"]
        env.update(self.env)
        env.update(extra)
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def exports(self) -> str:
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env.items())

    # -- PostgreSQL --------------------------------------------------------------------

    def _postgres(self) -> None:
        url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
        problem = _pg_probe(url)
        origin = "shared"
        if problem == "closed":
            bindir = _pg_bindir()
            if bindir is None:
                _apt_install("postgresql")
                # Debian's package may have started its own cluster where the URL points.
                problem = _pg_probe(url)
            if problem == "closed":
                url, origin = self._private_postgres(url)
                problem = None
        if problem:
            host = urlsplit(url).netloc.rpartition("@")[2]
            raise DevstackError(f"PostgreSQL at {host} answers but refuses us: {problem}")
        if self.test:
            url = _replace_url(url, path=f"/{TEST_DATABASE}")
        _pg_ensure_database(url, fresh=self.test)
        self.env["DATABASE_URL"] = url
        fresh = ", recreated empty" if self.test else ""
        say(f"✓ PostgreSQL at {_redact(url)} ({origin}{fresh})")

    def _private_postgres(self, template: str) -> tuple:
        self.private = True
        as_pg = _pg_user_kwargs()
        bindir = _pg_bindir()
        if bindir is None:
            raise DevstackError("initdb/pg_ctl not found even after installing postgresql")
        home = _pg_running_home(as_pg)
        if home is not None:
            port = _read_int(home / "port")
            if port:
                url = _pg_private_url(port, template)
                if _pg_probe(url) is None:
                    return url, f"private, {self._rel(home)}, reused"
            raise DevstackError(f"a private PostgreSQL runs from {home} but does not answer: "
                                f"run `scripts/devstack.py stop`; log: {home / 'postgres.log'}")
        home = _pg_prepare_home(as_pg)
        data, sock, log = home / "data", home / "sock", home / "postgres.log"
        if not (data / "PG_VERSION").exists():
            say(f"… initdb {self._rel(data)}")
            result = subprocess.run(
                [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                 "--encoding=UTF8", "--locale=C", "--no-sync"],
                capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=home, **as_pg)
            if result.returncode != 0:
                raise DevstackError(f"initdb failed: {result.stderr.strip() or result.stdout.strip()}")
            # A throwaway development cluster: durability is not worth the test time.
            with open(data / "postgresql.conf", "a") as conf:
                conf.write("\n# devstack: private development cluster\n"
                           "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                           "max_connections = 200\n")
        if not sock.exists():
            sock.mkdir(mode=0o700)
            if as_pg:
                os.chown(sock, as_pg["user"], as_pg["group"])
        port = _read_int(home / "port")
        if not port or port_open("127.0.0.1", port):
            port = free_port()
        options = f"-p {port} -k {shlex.quote(str(sock))} -c listen_addresses=127.0.0.1"
        say(f"… starting private PostgreSQL on 127.0.0.1:{port}")
        # Own session: a Ctrl-C in this terminal must not reach the postmaster.
        result = subprocess.run(
            [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=home, start_new_session=True, **as_pg)
        if result.returncode != 0:
            raise DevstackError(f"pg_ctl start failed: {result.stderr.strip()}\n{_tail(log)}")
        (home / "port").write_text(f"{port}\n")
        self.started.append((f"private PostgreSQL ({self._rel(home)})", lambda: stop_private_postgres(home)))
        url = _pg_private_url(port, template)
        problem = _pg_probe(url)
        if problem:
            raise DevstackError(f"private PostgreSQL started but refuses us: {problem}")
        return url, f"private, {self._rel(home)}, started"

    # -- Redis -------------------------------------------------------------------------

    def _redis(self) -> None:
        url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
        problem = _redis_probe(url)
        origin = "shared"
        if problem == "closed":
            url, origin = self._private_redis()
            problem = None
        if problem:
            raise DevstackError(f"Redis at {urlsplit(url).netloc.rpartition('@')[2]} answers but refuses us: {problem}")
        if self.test:
            url = _replace_url(url, path=f"/{TEST_REDIS_DB}")
            redis_command(url, "FLUSHDB")
        self.env["REDIS_URL"] = url
        flushed = ", flushed" if self.test else ""
        say(f"✓ Redis at {_redact(url)} ({origin}{flushed})")

    def _private_redis(self) -> tuple:
        self.private = True
        rdir = LOCAL / "redis"
        pid_file, port_file, log = rdir / "redis.pid", rdir / "redis.port", rdir / "redis.log"
        pid, port = _read_int(pid_file), _read_int(port_file)
        if pid and port and _pid_running(pid, "redis-server"):
            url = f"redis://127.0.0.1:{port}/0"
            if _redis_probe(url) is None:
                return url, "private, .local/redis, reused"
        binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
        if binary is None:
            _apt_install("redis-server")
            binary = shutil.which("redis-server") or "/usr/bin/redis-server"
            # Debian's package may have started one where REDIS_URL points.
            url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
            if _redis_probe(url) is None:
                self.private = False
                return url, "shared, just installed"
        rdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        say(f"… starting private Redis on 127.0.0.1:{port}")
        proc = start_process([binary, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                              "--dir", rdir, "--daemonize", "no"], log_path=log)
        pid_file.write_text(f"{proc.pid}\n")
        port_file.write_text(f"{port}\n")
        self.started.append(("private Redis (.local/redis)", lambda: self._stop_recorded(proc, pid_file, port_file)))
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 15
        while _redis_probe(url) is not None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise DevstackError(f"private Redis did not come up:\n{_tail(log)}")
            time.sleep(0.1)
        return url, "private, .local/redis, started"

    # -- moto --------------------------------------------------------------------------

    def _moto(self) -> None:
        external = os.environ.get("SQS_ENDPOINT_URL")
        if external and http_answers(external, timeout=3):
            self.env["SQS_ENDPOINT_URL"] = external
            self.env["S3_ENDPOINT_URL"] = os.environ.get("S3_ENDPOINT_URL") or external
            say(f"✓ moto/AWS endpoint at {external} (shared)")
            return
        if external:
            say(f"  SQS_ENDPOINT_URL={external} does not answer; starting moto instead")
        url, origin = self._private_moto()
        self.env["SQS_ENDPOINT_URL"] = url
        self.env["S3_ENDPOINT_URL"] = url
        say(f"✓ moto at {url} ({origin})")

    def _private_moto(self) -> tuple:
        self.private = True
        mdir = LOCAL / "moto"
        pid_file, port_file, log = mdir / "moto.pid", mdir / "moto.port", mdir / "moto.log"
        pid, port = _read_int(pid_file), _read_int(port_file)
        if pid and port and _pid_running(pid, "moto_server"):
            url = f"http://127.0.0.1:{port}"
            if http_answers(url, timeout=3):
                return url, "private, .local/moto, reused"
        binary = tool("moto_server")
        port = MOTO_PREFERRED_PORT if not port_open("127.0.0.1", MOTO_PREFERRED_PORT) else free_port()
        mdir.mkdir(parents=True, exist_ok=True)
        say(f"… starting moto on 127.0.0.1:{port}")
        proc = start_process([binary, "-H", "127.0.0.1", "-p", port], log_path=log)
        pid_file.write_text(f"{proc.pid}\n")
        port_file.write_text(f"{port}\n")
        self.started.append(("moto (.local/moto)", lambda: self._stop_recorded(proc, pid_file, port_file)))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while not http_answers(url, timeout=1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise DevstackError(f"moto did not come up:\n{_tail(log)}")
        return url, "private, .local/moto, started"

    # -- AWS resources -----------------------------------------------------------------

    def _aws(self) -> None:
        queue_name = TEST_QUEUE_NAME if self.test else (os.environ.get("SQS_QUEUE_NAME") or DEFAULT_QUEUE_NAME)
        bucket = TEST_BUCKET if self.test else (os.environ.get("S3_RESULT_BUCKET") or DEFAULT_BUCKET)
        region = os.environ.get("AWS_REGION") or DEFAULT_AWS_REGION
        sqs_endpoint = self.env.get("SQS_ENDPOINT_URL", os.environ.get("SQS_ENDPOINT_URL"))
        s3_endpoint = self.env.get("S3_ENDPOINT_URL", os.environ.get("S3_ENDPOINT_URL"))
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            queue_url = ensure_queue(queue_name, region, sqs_endpoint, fresh=self.test)
            # The sweeps' queue (celeryconfig.task_queues): created here so that a
            # fresh test run starts it empty; Celery would create it on first use.
            ensure_queue(f"{queue_name}-sweeps", region, sqs_endpoint, fresh=self.test)
            ensure_bucket(bucket, region, s3_endpoint, empty=self.test)
        except (BotoCoreError, ClientError) as exc:
            raise DevstackError(f"AWS resources at {sqs_endpoint or 'AWS'}: {exc}") from None
        self.env.update({
            "AWS_REGION": region,
            "SQS_QUEUE_NAME": queue_name,
            "SQS_QUEUE_URL": queue_url,
            "S3_RESULT_BUCKET": bucket,
        })
        if sqs_endpoint:
            self.env["SQS_ENDPOINT_URL"] = sqs_endpoint
        if s3_endpoint:
            self.env["S3_ENDPOINT_URL"] = s3_endpoint
        emptied = " (fresh)" if self.test else ""
        say(f"✓ SQS queue {queue_name} (DLQ {queue_name}-dlq after {DLQ_MAX_RECEIVE_COUNT} receives){emptied}: {queue_url}")
        say(f"✓ S3 bucket {bucket}{emptied}")

    # -- misc --------------------------------------------------------------------------

    @staticmethod
    def _stop_recorded(proc: subprocess.Popen, *state_files: Path) -> None:
        stop_process(proc)
        for path in state_files:
            with contextlib.suppress(OSError):
                path.unlink()

    @staticmethod
    def _rel(path: Path) -> str:
        with contextlib.suppress(ValueError):
            return str(path.relative_to(ROOT))
        return str(path)


def _aws_client(service: str, region: str, endpoint: str | None):
    import boto3
    from botocore.config import Config

    kwargs = {"region_name": region,
              "config": Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": 3},
                               s3={"addressing_style": "path"})}
    if endpoint:
        kwargs["endpoint_url"] = endpoint
        # Same rule as dpp.config: static keys only for a loopback endpoint (moto).
        if is_loopback_url(endpoint) and not os.environ.get("AWS_ACCESS_KEY_ID"):
            kwargs.update(STATIC_TEST_CREDENTIALS)
    return boto3.client(service, **kwargs)


def ensure_queue(name: str, region: str, endpoint: str | None, fresh: bool = False) -> str:
    """Create (or update) `<name>-dlq` and `<name>` with the redrive policy; the queue URL.

    `fresh` (moto only) deletes both queues first, so no message of an earlier run is left.
    Deleting beats PurgeQueue, which moto limits to once a minute like real SQS; real SQS
    would also refuse to recreate a deleted queue for a minute, hence moto only.
    """
    sqs = _aws_client("sqs", region, endpoint)
    if fresh and is_loopback_url(endpoint):
        for queue in (name, f"{name}-dlq"):
            try:
                sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=queue)["QueueUrl"])
            except sqs.exceptions.QueueDoesNotExist:
                pass

    def upsert(queue: str, attributes: dict) -> str:
        try:
            url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
        except sqs.exceptions.QueueDoesNotExist:
            try:
                return sqs.create_queue(QueueName=queue, Attributes=attributes)["QueueUrl"]
            except sqs.exceptions.QueueNameExists:
                # Created between our look and our create (a worker declaring the
                # sweeps queue on first use, with other attributes): set ours on it.
                url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
        if attributes:
            sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
        return url

    dlq_url = upsert(f"{name}-dlq", {})
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    url = upsert(name, {
        "VisibilityTimeout": QUEUE_VISIBILITY_TIMEOUT,
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": DLQ_MAX_RECEIVE_COUNT}),
    })
    return url


def ensure_bucket(name: str, region: str, endpoint: str | None, empty: bool = False) -> None:
    """Create the bucket if missing; with `empty` (moto only) delete every object in it."""
    from botocore.exceptions import ClientError

    s3 = _aws_client("s3", region, endpoint)
    try:
        s3.head_bucket(Bucket=name)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
        kwargs = {"Bucket": name}
        if region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            s3.create_bucket(**kwargs)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
    if empty and is_loopback_url(endpoint):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})


# --------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------

def migrate(stack: Stack) -> None:
    """Schema to head, then the plans (idempotent), against the stack's database."""
    env = stack.child_env()
    for cmd, what in (([tool("alembic"), "upgrade", "head"], "migrations at head"),
                      ([tool("dpp"), "plans", "seed"], "plans seeded")):
        result = subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=sys.stderr, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise DevstackError(f"`{Path(cmd[0]).name} {' '.join(cmd[1:])}` exited with {result.returncode}")
        say(f"✓ {what}")


def cmd_services(args) -> int:
    stack = Stack(test=args.test).up()
    sys.stdout.write(stack.exports())
    return 0


def cmd_migrate(args) -> int:
    stack = Stack(test=args.test).up()
    try:
        migrate(stack)
    except BaseException:
        stack.down()
        raise
    return 0


def cmd_aws(args) -> int:
    """Only the AWS resources, against the endpoints in the environment (compose init)."""
    stack = Stack(test=args.test)
    stack._aws()
    sys.stdout.write(stack.exports())
    return 0


def cmd_stop(args) -> int:
    stopped = False
    for name, needle in (("moto", "moto_server"), ("redis", "redis-server")):
        rdir = LOCAL / name
        pid = _read_int(rdir / f"{name}.pid")
        if pid and _pid_running(pid, needle):
            _stop_pid(pid)
            say(f"✓ stopped private {name} (pid {pid})")
            stopped = True
        for suffix in ("pid", "port"):
            with contextlib.suppress(OSError):
                (rdir / f"{name}.{suffix}").unlink()
    if stop_private_postgres():
        say("✓ stopped private PostgreSQL")
        stopped = True
    if not stopped:
        say("nothing to stop")
    return 0


def _install_interrupt_handlers() -> None:
    def handler(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_COLORS = ["\033[36m", "\033[33m", "\033[35m", "\033[32m", "\033[34m"]
_print_lock = threading.Lock()


def _pump(role: str, proc: subprocess.Popen, color: str) -> threading.Thread:
    """Copy a child's output to ours, each line prefixed with its role (like honcho)."""
    reset = "\033[0m" if color else ""
    prefix = f"{color}{role:<6} |{reset} "

    def run():
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            with _print_lock:
                sys.stdout.write(prefix + line + "\n")
                sys.stdout.flush()
        proc.stdout.close()

    thread = threading.Thread(target=run, name=f"pump-{role}", daemon=True)
    thread.start()
    return thread


def _cli(env: dict, *args: str) -> str:
    result = subprocess.run([tool("dpp"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise DevstackError(f"`dpp {' '.join(args)}` failed ({result.returncode}): "
                            f"{(result.stderr or result.stdout).strip()}")
    return result.stdout


def _demo_tenant(env: dict) -> tuple:
    tenant = "demo-" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(6))
    _cli(env, "tenant", "create", "--id", tenant, "--plan", "pro")
    lines = [line.strip() for line in _cli(env, "key", "issue", "--tenant", tenant).splitlines() if line.strip()]
    if not lines:
        raise DevstackError("`dpp key issue` printed no key")
    _cli(env, "budget", "topup", "--tenant", tenant, "--amount", "10.00", "--reference", f"{tenant}-welcome")
    return tenant, lines[-1]


def _banner(tenant: str, key: str, api: str, flower: str, basic_auth: str, private: bool,
            worker_metrics_port: int = 9101, beat_metrics_port: int = 9102) -> str:
    user, _, password = basic_auth.split(",")[0].partition(":")
    body = json.dumps({
        "pack_type": "decision",
        "inputs": {
            "question": "Which database?",
            "options": ["Postgres", "MySQL"],
            "criteria": [{"name": "cost", "weight": 1, "direction": "min"}, {"name": "features", "weight": 2}],
            "scores": {"Postgres": {"cost": 1, "features": 9}, "MySQL": {"cost": 1, "features": 7}},
        },
        "max_cost_usd": "0.50",
    }, separators=(",", ":"))
    auth = f'-H "Authorization: Bearer {key}"'
    rule = "═" * 78
    lines = [
        rule,
        " DPP is running — Ctrl-C stops everything it started",
        rule,
        f" Demo tenant  {tenant}  (plan pro, budget 10.00 USD)",
        f" API key      {key}",
        "",
        " Submit a decision run:",
        f"curl -s -X POST {api}/v1/runs {auth} -H \"Idempotency-Key: demo-1\" "
        f"-H \"Content-Type: application/json\" -d '{body}'",
        "",
        " Follow it (run_id from the answer above):",
        f"curl -s {api}/v1/runs/<run_id> {auth}",
        "",
        " Balance:",
        f"curl -s {api}/v1/balance {auth}",
        "",
        " Ledger view of the same money:",
        f".venv/bin/dpp budget show --tenant {tenant}",
        "",
        f" Flower       {flower}  (user {user}, password {password}; FLOWER_BASIC_AUTH to change)",
        f" API docs     {api}/docs",
        f" Metrics      {api}/metrics  http://127.0.0.1:{worker_metrics_port}/metrics (worker)"
        f"  http://127.0.0.1:{beat_metrics_port}/metrics (beat)",
        " Ping workers .venv/bin/celery -A dpp inspect ping    (in a shell set up as below)",
    ]
    if private:
        lines += ["", " Private services in use: in another shell, first run",
                  ' eval "$(.venv/bin/python scripts/devstack.py services)"']
    lines.append(rule)
    return "\n".join(lines)


def platform_commands(api_port: int, flower_port: int, basic_auth: str, metrics_ports: dict | None = None,
                      state_dir: Path = LOCAL) -> list:
    """(role, argv, extra env) of the processes `run` starts, in start order (stopped in reverse).

    Worker and beat serve /metrics and /healthz on `metrics_ports[role]`; every role
    gets its own PROMETHEUS_MULTIPROC_DIR (emptied here), where its processes'
    samples are aggregated.
    """
    metrics_ports = metrics_ports or {}
    # No gossip or mingle: over SNS every worker would receive every task event.
    worker = [tool("celery"), "-A", "dpp", "worker", "-l", "INFO", "-c", "1", "-n", "worker1@%h",
              "--without-gossip", "--without-mingle"]
    commands = [
        ("api", [tool("gunicorn"), "-b", f"127.0.0.1:{api_port}", "-w", "2", "--access-logfile", "-",
                 "dpp.api:create_app()"]),
        ("worker", worker),
        ("beat", [tool("celery"), "-A", "dpp", "beat", "-l", "INFO"]),
        ("flower", [tool("celery"), "-A", "dpp", "flower", "--address=127.0.0.1", f"--port={flower_port}",
                    f"--basic-auth={basic_auth}"]),
    ]
    result = []
    for role, argv in commands:
        extra = {}
        if role != "flower":
            directory = Path(state_dir) / "prometheus" / role
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            extra["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        if role in metrics_ports:
            extra["DPP_METRICS_PORT"] = str(metrics_ports[role])
        result.append((role, argv, extra))
    return result


def cmd_run(args) -> int:
    api_port = int(os.environ.get("DPP_API_PORT", "8000"))
    flower_port = int(os.environ.get("DPP_FLOWER_PORT", "5555"))
    worker_metrics_port = int(os.environ.get("DPP_WORKER_METRICS_PORT", "9101"))
    beat_metrics_port = int(os.environ.get("DPP_BEAT_METRICS_PORT", "9102"))
    for role, port in (("API", api_port), ("Flower", flower_port), ("worker metrics", worker_metrics_port),
                       ("beat metrics", beat_metrics_port)):
        if port_open("127.0.0.1", port):
            raise DevstackError(f"port {port} for the {role} is already in use (another `make run`?)")
    api = f"http://127.0.0.1:{api_port}"
    flower = f"http://127.0.0.1:{flower_port}"

    # Only `run` supervises: imported here so the image's `devstack.py aws` needs this file alone.
    from role_supervisor import Supervisor

    stack = Stack()
    supervisor = None
    pumps: list = []
    code = 0
    _install_interrupt_handlers()
    try:
        stack.up()
        migrate(stack)
        env = stack.child_env(DPP_JSON_LOGS=os.environ.get("DPP_JSON_LOGS") or "0")
        basic_auth = env["FLOWER_BASIC_AUTH"]
        colorize = sys.stdout.isatty()
        metrics_ports = {"worker": worker_metrics_port, "beat": beat_metrics_port}
        commands = platform_commands(api_port, flower_port, basic_auth, metrics_ports)
        colors = {role: _COLORS[index % len(_COLORS)] if colorize else ""
                  for index, (role, _, _) in enumerate(commands)}
        argv = {role: (cmd, extra) for role, cmd, extra in commands}

        def start(role: str) -> subprocess.Popen:
            cmd, extra = argv[role]
            proc = start_process(cmd, env={**env, **extra})
            pumps.append(_pump(role, proc, colors[role]))
            return proc

        # One role dying (beat losing Redis, the worker OOM-killed) restarts that role
        # alone; the API, Flower and the rest keep serving.
        supervisor = Supervisor(start, say=say, cleanup=stop_process)
        for role in argv:
            say(f"✓ started {role} (pid {supervisor.launch(role).pid})")

        deadline = time.monotonic() + 90
        while not http_answers(f"{api}/health", timeout=1, status=200):
            supervisor.poll()
            if "api" in supervisor.given_up:
                raise DevstackError("the API kept exiting before it answered; its output is above")
            if time.monotonic() > deadline:
                raise DevstackError(f"{api}/health did not answer 200 within 90 s")
        say(f"✓ API at {api}")

        try:
            tenant, key = _demo_tenant(env)
        except DevstackError as exc:
            say(f"✗ demo tenant not created, the stack keeps running: {exc}")
        else:
            banner = _banner(tenant, key, api, flower, basic_auth, stack.private,
                             worker_metrics_port, beat_metrics_port)
            with _print_lock:
                print(banner, flush=True)

        while supervisor.running():
            supervisor.poll()
            time.sleep(0.5)
        raise DevstackError("every role was given up on")
    except Interrupted as exc:
        say(f"… {exc}: stopping")
    except DevstackError as exc:
        say(f"✗ {exc}")
        code = 1
    finally:
        _ignore_interrupts()
        if supervisor is not None and supervisor.procs:
            stop_processes(list(reversed(supervisor.procs.values())))
            say(f"✓ stopped {', '.join(supervisor.procs)}")
        for pump in pumps:
            pump.join(timeout=2)
        stack.down()
    return code


def cmd_test(args) -> int:
    stack = Stack(test=True)
    pytest: list = []  # the running pytest, for the SIGTERM handler

    def on_term(signum, frame):
        if pytest:
            pytest[0].send_signal(signal.SIGTERM)  # let pytest stop; we clean up after it
        else:
            raise Interrupted("SIGTERM")

    signal.signal(signal.SIGTERM, on_term)
    code = 1
    try:
        stack.up()
        migrate(stack)
        env = stack.child_env(DPP_TEST="1")
        say(f"… {Path(venv_python()).name} -m pytest {' '.join(args.pytest_args)}")
        proc = subprocess.Popen([venv_python(), "-m", "pytest", *args.pytest_args], cwd=ROOT, env=env)
        pytest.append(proc)
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:
                continue  # pytest shares our process group: it got the SIGINT and stops itself
    except (Interrupted, KeyboardInterrupt) as exc:
        say(f"… interrupted ({exc or 'SIGINT'})")
        code = 130
    except DevstackError as exc:
        say(f"✗ {exc}")
        code = 1
    finally:
        _ignore_interrupts()
        stack.down()
    if code < 0:
        code = 128 - code  # killed by a signal: the shell's convention, not a wrapped -N
    if code == 5:
        say("✗ pytest collected no tests (exit 5): failing — CI must never pass on zero tests")
        return 1
    return code


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devstack.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("services", cmd_services, "ensure PostgreSQL, Redis, moto; print exports"),
                             ("migrate", cmd_migrate, "services, then alembic upgrade head and dpp plans seed"),
                             ("aws", cmd_aws, "create queues and bucket at the configured endpoints")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--test", action="store_true", help="the test database, Redis DB, queue and bucket")
        p.set_defaults(func=func)
    sub.add_parser("run", help="the whole platform plus a demo tenant, until Ctrl-C").set_defaults(func=cmd_run)
    sub.add_parser("test", help="fresh test services, migrate, pytest [pytest args...]")
    sub.add_parser("stop", help="stop the private services recorded in .local/").set_defaults(func=cmd_stop)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["test"]:
        # Everything after `test` belongs to pytest, options included (-k, -x, --lf).
        args = argparse.Namespace(func=cmd_test, pytest_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DevstackError as exc:
        say(f"✗ {exc}")
        return 1
    except (KeyboardInterrupt, Interrupted):
        return 130


if __name__ == "__main__":
    sys.exit(main())
