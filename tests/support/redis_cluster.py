"""A real 3-master Redis Cluster on loopback, started and stopped by a test (issue 5).

SPEC §2 says the budget scripts "must work unchanged on Redis Cluster / Valkey
Serverless". The only way to know is to run them on a cluster: this module starts
`masters` redis-server processes (no persistence, loopback only, free ports, never
the machine's 6379), joins them with `redis-cli --cluster create … --cluster-replicas 0`,
waits until every node reports `cluster_state:ok`, and stops them by PID.

Failing to form the cluster raises `ClusterError` (with the nodes' log tails and
redis-cli's output): a test that depends on it must fail, never skip.

Every node also gets its own cluster-bus port (`--cluster-port`, Redis >= 7), taken
from the OS like the client port, so `port + 10000` never has to be free or ≤ 65535.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

import devstack  # noqa: E402

REDIS_SERVER = "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else (
    shutil.which("redis-server") or "/usr/bin/redis-server")
REDIS_CLI = "/usr/bin/redis-cli" if Path("/usr/bin/redis-cli").exists() else (
    shutil.which("redis-cli") or "/usr/bin/redis-cli")
HOST = "127.0.0.1"
HASH_SLOTS = 16384
NEVER_PORTS = {6379, 16379}  # the machine's Redis and its cluster bus: never ours


class ClusterError(RuntimeError):
    """The cluster could not be started or formed (the message says why)."""


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _info(raw: str) -> dict:
    return dict(line.split(":", 1) for line in raw.splitlines() if ":" in line)


class LocalRedisCluster:
    """`masters` redis-server processes in cluster mode, joined into one cluster.

    `start()` → ports, `client()` a `redis.cluster.RedisCluster` on the first node,
    `node(port)` a plain client on one node, `slot_owner(slot)` the port of the master
    serving a slot (from CLUSTER SLOTS), `stop()` ends every process by PID.
    """

    def __init__(self, base_dir: Path, masters: int = 3, node_timeout_ms: int = 2000):
        self.base_dir = Path(base_dir)
        self.masters = masters
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        self.bus_ports: list[int] = []
        self.procs: list[subprocess.Popen] = []
        self.create_output = ""

    # ---------------------------------------------------------------- start / stop

    def start(self, timeout: float = 30.0) -> "LocalRedisCluster":
        for tool in (REDIS_SERVER, REDIS_CLI):
            if not Path(tool).exists():
                raise ClusterError(f"{tool} not found: a Redis Cluster cannot be started")
        deadline = time.monotonic() + timeout
        try:
            self._start_nodes(deadline)
            self._create(deadline)
            self._wait_ok(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _pick_ports(self) -> list[int]:
        ports: list[int] = []
        while len(ports) < 2 * self.masters:
            port = devstack.free_port(HOST)
            if port not in ports and port not in NEVER_PORTS:
                ports.append(port)
        return ports

    def _start_nodes(self, deadline: float, attempts: int = 3) -> None:
        """Start the processes; new ports and another try if one lost a port race."""
        for attempt in range(1, attempts + 1):
            ports = self._pick_ports()
            self.ports, self.bus_ports = ports[: self.masters], ports[self.masters:]
            self.base_dir.mkdir(parents=True, exist_ok=True)
            self.procs = [
                devstack.start_process(
                    [REDIS_SERVER, "--port", port, "--cluster-port", bus, "--bind", HOST,
                     "--cluster-enabled", "yes",
                     "--cluster-config-file", self.base_dir / f"nodes-{port}.conf",
                     "--cluster-node-timeout", self.node_timeout_ms,
                     "--save", "", "--appendonly", "no", "--dir", self.base_dir,
                     "--daemonize", "no", "--protected-mode", "yes"],
                    log_path=self._log(port), cwd=self.base_dir,
                )
                for port, bus in zip(self.ports, self.bus_ports)
            ]
            try:
                self._wait_ping(deadline)
                return
            except ClusterError:
                lost_race = any("Address already in use" in _tail(self._log(p), 50) for p in self.ports)
                self.stop()
                if not lost_race or attempt == attempts:
                    raise

    def _log(self, port: int) -> Path:
        return self.base_dir / f"redis-{port}.log"

    def _wait_ping(self, deadline: float) -> None:
        for port, proc in zip(self.ports, self.procs):
            while devstack._redis_probe(f"redis://{HOST}:{port}/0") is not None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise ClusterError(self._describe(f"redis-server on {port} did not come up"))
                time.sleep(0.05)

    def _create(self, deadline: float) -> None:
        cmd = [REDIS_CLI, "--cluster", "create", *(f"{HOST}:{p}" for p in self.ports),
               "--cluster-replicas", "0", "--cluster-yes"]
        try:
            result = subprocess.run(cmd, cwd=self.base_dir, stdin=subprocess.DEVNULL, capture_output=True,
                                    text=True, timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(self._describe(f"`{' '.join(cmd)}` timed out:\n{exc.stdout or ''}")) from exc
        self.create_output = result.stdout + result.stderr
        if result.returncode != 0 or "[OK] All 16384 slots covered" not in self.create_output:
            raise ClusterError(self._describe(
                f"`{' '.join(cmd)}` exited with {result.returncode}:\n{self.create_output}"))

    def _wait_ok(self, deadline: float) -> None:
        """Every node: cluster_state:ok, all slots assigned and ok, every master known."""
        want = {"cluster_state": "ok", "cluster_slots_assigned": str(HASH_SLOTS),
                "cluster_slots_ok": str(HASH_SLOTS), "cluster_known_nodes": str(self.masters),
                "cluster_size": str(self.masters)}
        last: dict = {}
        while True:
            pending = []
            for port in self.ports:
                try:
                    info = _info(devstack.redis_command(f"redis://{HOST}:{port}/0", "CLUSTER", "INFO"))
                except Exception as exc:  # noqa: BLE001 - reported below if it lasts
                    info = {"error": str(exc)}
                last[port] = info
                if any(info.get(k) != v for k, v in want.items()):
                    pending.append(port)
            if not pending:
                return
            if time.monotonic() > deadline:
                seen = {p: {k: last[p].get(k) for k in (*want, "error") if k in last[p]} for p in pending}
                raise ClusterError(self._describe(f"cluster not ok on {pending}: {seen}"))
            time.sleep(0.1)

    def _describe(self, problem: str) -> str:
        logs = "\n".join(f"--- redis-{p}.log\n{_tail(self._log(p))}" for p in self.ports)
        return f"{problem}\n{logs}"

    def stop(self) -> None:
        """SIGTERM each process group by PID (SIGKILL after the timeout); wait for the ports."""
        procs = [p for p in self.procs if p.poll() is None]
        if procs:
            devstack.stop_processes(procs)
        for proc in self.procs:
            if proc.poll() is None:  # stop_processes waits; this only reaps
                proc.wait(5)
        deadline = time.monotonic() + 10
        for port in self.ports:
            while devstack.port_open(HOST, port, timeout=0.2):
                if time.monotonic() > deadline:
                    raise ClusterError(f"port {port} still open after stopping the cluster")
                time.sleep(0.05)
        self.procs = []

    # ---------------------------------------------------------------- clients

    def client(self, **kwargs):
        """A `redis.cluster.RedisCluster` that discovers the cluster from the first node."""
        from redis.cluster import RedisCluster

        return RedisCluster(host=HOST, port=self.ports[0], **kwargs)

    def node(self, port: int, **kwargs):
        """A plain (non-cluster) client on one node, e.g. to look at its own keys."""
        import redis

        return redis.Redis(host=HOST, port=port, **kwargs)

    def slot_ranges(self) -> list[tuple[int, int, int]]:
        """(first slot, last slot, master port) for every range, from CLUSTER SLOTS."""
        with self.node(self.ports[0]) as node:
            raw = node.execute_command("CLUSTER SLOTS")
        return sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in raw)

    def slot_owner(self, slot: int) -> int:
        for first, last, port in self.slot_ranges():
            if first <= slot <= last:
                return port
        raise ClusterError(f"slot {slot} has no master")


@contextmanager
def redis_cluster(base_dir: Path, masters: int = 3):
    cluster = LocalRedisCluster(base_dir, masters).start()
    try:
        yield cluster
    finally:
        cluster.stop()
