"""Chaos runner: break the real platform at every fault point and prove no money moved wrongly.

    .venv/bin/python scripts/chaos.py --trials 30      (make chaos CHAOS_TRIALS=30)

It owns every service it breaks: a private PostgreSQL (devstack's), a Redis of
its own with an append-only file (so it can be restarted with or without its
data) and a moto server of its own (restartable). It runs gunicorn, a celery
worker and celery beat with short timers, re-starting whichever dies, and for
each trial arms one fault (a one-shot fault token, or a disruption it does
itself), plays the agent with `dpp.client` (which retries with the same
Idempotency-Key), waits for the sweeps, and checks SPEC §2 invariants 1-3 on a
tenant of the trial's own.

It writes build/chaos-report.json and prints a table. Exit code 1 when any
trial leaked, double-charged or got stuck.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import devstack  # noqa: E402

sys.path.insert(0, str(devstack.ROOT))  # the test-only packs (tests.support.packs) the judge prices

ROOT = devstack.ROOT
BIN = devstack.VENV_BIN
STATE = devstack.LOCAL / "chaos"

LEASE_SEC, HEARTBEAT_SEC, VISIBILITY_SEC = 3, 1, 5
THRESHOLD_SEC, QUEUED_TIMEOUT_SEC, ORPHAN_GRACE_SEC = 3, 12, 3
SWEEP_SEC, WATCH_SEC, REDRIVE_ATTEMPTS = 1, 1, 3
# A SIGKILLed process is restarted by the supervisor and serving again within this
# (celery's boot on two busy cores; measured 3-6 s, with head-room).
RESTART_SEC = 10

WORKER_POINTS = ["after_lease_claim", "mid_pack", "after_finalize_claim", "after_s3_upload",
                 "after_redis_settle", "after_ledger_commit"]
API_POINTS = ["after_reserve", "after_run_row", "after_enqueue"]
SWEEP_POINTS = ["sweep_between_read_and_write", "orphan_sweep_between_read_and_write"]
DISRUPTIONS = ["worker_sigkill", "api_sigkill", "redis_restart_with_data", "redis_restart_without_data",
               "redis_flushall", "pg_terminate_backends", "pg_restart", "moto_restart", "message_redelivery",
               "worker_sigstop"]
ALL = WORKER_POINTS + API_POINTS + SWEEP_POINTS + DISRUPTIONS
# Two faults in one trial, started together on the same tenant's runs.
PAIRS = ["redis_restart_without_data+worker_sigkill", "moto_restart+pg_terminate_backends",
         "redis_flushall+after_redis_settle", "pg_restart+api_sigkill", "worker_sigstop+redis_restart_with_data"]


def bound(point: str) -> float:
    """Seconds from a trial's fault to every run of its tenant settled (docs/CHAOS.md).

    Each term is a mechanism of SPEC §2 invariant 4 and §3, at the runner's timers:
    - a run whose worker died: lease TTL + one lease sweep, after the worker is back;
    - a stuck finalize claim: reconcile threshold + one reconcile sweep;
    - a lost message: re-driven every timeout / attempts, failed at 0 after the
      whole stale-queued timeout + one sweep;
    - an orphan hold: its grace + one orphan sweep;
    - a Redis that lost its data: one mirror watch (then the above);
    - a redelivered message: the SQS visibility timeout.
    A trial with two faults gets the larger bound plus one process restart.
    """
    parts = point.split("+")
    if len(parts) > 1:
        return max(bound(p) for p in parts) + RESTART_SEC
    lease = LEASE_SEC + SWEEP_SEC
    claim = THRESHOLD_SEC + SWEEP_SEC
    lost_message = QUEUED_TIMEOUT_SEC + SWEEP_SEC
    orphan = ORPHAN_GRACE_SEC + SWEEP_SEC
    base = {
        "after_reserve": RESTART_SEC + orphan + lost_message,
        "after_run_row": RESTART_SEC + lost_message,
        "after_enqueue": RESTART_SEC + VISIBILITY_SEC + lease,
        "sweep_between_read_and_write": RESTART_SEC + VISIBILITY_SEC + lease + claim,
        "orphan_sweep_between_read_and_write": RESTART_SEC + orphan * 2 + lost_message,
        "worker_sigkill": RESTART_SEC + VISIBILITY_SEC + lease + claim,
        "worker_sigstop": LEASE_SEC + 2 + VISIBILITY_SEC + lease + claim,
        "api_sigkill": RESTART_SEC + orphan + lost_message,
        "redis_restart_with_data": RESTART_SEC + VISIBILITY_SEC + lease + claim,
        "redis_restart_without_data": RESTART_SEC + WATCH_SEC + VISIBILITY_SEC + lease + claim,
        "redis_flushall": WATCH_SEC + VISIBILITY_SEC + lease + claim,
        "pg_terminate_backends": VISIBILITY_SEC + lease + claim,
        "pg_restart": RESTART_SEC + VISIBILITY_SEC + lease + claim,
        "moto_restart": RESTART_SEC + lost_message + claim,
        "message_redelivery": VISIBILITY_SEC + SWEEP_SEC,
    }
    return float(base.get(point, RESTART_SEC + VISIBILITY_SEC + lease + claim))


DECISION = {
    "question": "Which database?",
    "options": ["Postgres", "MySQL"],
    "criteria": [{"name": "cost", "weight": 1, "direction": "min"}, {"name": "features", "weight": 2}],
    "scores": {"Postgres": {"cost": 1, "features": 9}, "MySQL": {"cost": 1, "features": 7}},
}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Services the runner owns and breaks
# --------------------------------------------------------------------------------------

class OwnRedis:
    """redis-server with an fsync-always AOF: a restart keeps the data unless wiped."""

    def __init__(self, home: Path):
        self.home, self.port, self.proc = home, devstack.free_port(), None
        self.restarting = threading.Lock()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.proc = devstack.start_process(
            ["/usr/bin/redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.home)],
            log_path=self.home / "redis.log",
        )
        wait(lambda: devstack._redis_probe(self.url) is None, 15, "Redis to answer")

    def restart(self, keep_data: bool) -> None:
        with self.restarting:  # one restart at a time: parallel trials share this Redis
            self.proc.send_signal(signal.SIGKILL)  # no clean shutdown: the AOF is all it keeps
            self.proc.wait(10)
            if not keep_data:
                for child in self.home.iterdir():
                    if child.name != "redis.log":
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
            self.start()

    def flushall(self) -> None:
        """Every key gone while Redis keeps running (an operator's FLUSHALL, a bad failover)."""
        devstack.redis_command(self.url, "FLUSHALL")

    def stop(self) -> None:
        if self.proc is not None:
            devstack.stop_process(self.proc)


_PG_RESTART = threading.Lock()


def restart_postgres() -> None:
    """Restart the runner's private PostgreSQL in immediate mode (a crash: no checkpoint).

    One restart at a time (parallel trials), and the server is always brought back:
    a failed start is retried, as an operator's supervisor would.
    """
    as_pg = devstack._pg_user_kwargs()
    with _PG_RESTART:
        home = devstack._pg_running_home(as_pg) or next(
            h for h in devstack._pg_homes() if (h / "data" / "PG_VERSION").exists())
        pg_ctl = [str(devstack._pg_bindir() / "pg_ctl"), "-D", str(home / "data"), "-l", str(home / "postgres.log"),
                  "-w", "-t", "60"]
        run = lambda *args: subprocess.run(pg_ctl + list(args), capture_output=True, text=True,  # noqa: E731
                                           stdin=subprocess.DEVNULL, cwd=home, start_new_session=True, **as_pg)
        result = run("-m", "immediate", "restart")
        for _ in range(5):
            if result.returncode == 0 or run("status").returncode == 0:
                return
            time.sleep(1)
            result = run("start")
        raise RuntimeError(f"pg_ctl could not bring PostgreSQL back: {result.stderr.strip()}")


class OwnMoto:
    def __init__(self, home: Path):
        self.home, self.port, self.proc = home, devstack.free_port(), None
        self.restarting = threading.Lock()  # held across a restart and the queues' re-creation

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.proc = devstack.start_process([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                           log_path=self.home / "moto.log")
        wait(lambda: devstack.http_answers(self.url, timeout=1), 30, "moto to answer")

    def restart(self) -> None:
        """SIGKILL and start again; the caller holds `restarting` until it re-created the queues."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.start()

    @contextlib.contextmanager
    def frozen(self):
        """SIGSTOP for the block: unreachable (connections hang), nothing lost."""
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            devstack.stop_process(self.proc)


class Platform:
    """API, worker and beat, restarted by a supervisor thread whenever one dies."""

    def __init__(self, env: dict, logs: Path):
        self.env, self.logs = env, logs
        self.port = devstack.free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._freeze_lock = threading.Lock()
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _args(self, role: str) -> list[str]:
        return {
            "api": [str(BIN / "gunicorn"), "-b", f"127.0.0.1:{self.port}", "-w", "2", "--timeout", "30",
                    "dpp.api:create_app()"],
            "worker": [str(BIN / "celery"), "-A", "dpp", "worker", "-l", "INFO", "-c", "2", "-n", f"chaos-{uuid.uuid4().hex[:4]}@%h",
                       "-Q", self.env["SQS_QUEUE_NAME"], "--without-gossip", "--without-mingle", "--without-heartbeat"],
            # The sweeps' own worker, as a deployment would run it: sweeps never wait
            # behind runs, runs never behind sweeps. Two processes: the budget audit
            # of every tenant grows with the tenants a long run creates (1.2-1.5 s at
            # 280, every 2 s), and one process spent most of its time auditing while
            # the lease sweeps it delayed expired unrun (the >=1,000-trial attempt).
            "sweeper": [str(BIN / "celery"), "-A", "dpp", "worker", "-l", "INFO", "-c", "2",
                        "-n", f"chaos-sweeper-{uuid.uuid4().hex[:4]}@%h", "-Q", f"{self.env['SQS_QUEUE_NAME']}-sweeps",
                        "--without-gossip", "--without-mingle", "--without-heartbeat"],
            "beat": [str(BIN / "celery"), "-A", "dpp", "beat", "-l", "INFO", "-s", str(self.logs / "beat-schedule")],
        }[role]

    def start(self, role: str) -> None:
        with self._lock:
            log = self.logs / f"{role}.log"
            self.procs[role] = devstack.start_process(self._args(role), env=self.env, log_path=log, cwd=ROOT)

    def up(self) -> None:
        for role in ("api", "worker", "sweeper", "beat"):
            self.start(role)
        wait(lambda: devstack.http_answers(f"{self.url}/health", timeout=1, status=200), 60, "the API")
        threading.Thread(target=self._supervise, daemon=True).start()

    def kill(self, role: str) -> None:
        self.signal(role, signal.SIGKILL)

    @contextlib.contextmanager
    def frozen(self, role: str):
        """SIGSTOP the role for the block, then SIGCONT; one freeze at a time (parallel
        trials would otherwise thaw each other's worker early)."""
        with self._freeze_lock:
            self.signal(role, signal.SIGSTOP)
            try:
                yield
            finally:
                self.signal(role, signal.SIGCONT)

    def signal(self, role: str, sig: int) -> None:
        with self._lock:
            proc = self.procs[role]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def _supervise(self) -> None:
        while not self._stop.wait(0.2):
            for role in list(self.procs):
                if self.procs[role].poll() is not None and not self._stop.is_set():
                    try:  # the group's survivors (pool processes) must go too
                        os.killpg(self.procs[role].pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    self.restarts[role] = self.restarts.get(role, 0) + 1
                    self.start(role)

    def down(self) -> None:
        self._stop.set()
        devstack.stop_processes(list(self.procs.values()))


# --------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------

@dataclass
class Outcome:
    point: str
    under_load: bool = False
    leaks: int = 0
    double_charges: int = 0
    stuck: int = 0
    seconds: float = 0.0
    bound_sec: float = 0.0
    runs: int = 0
    fault_times: list = field(default_factory=list)  # monotonic seconds of each fault that fired
    fired: bool = True  # False when an armed fault point was never reached
    notes: list = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.leaks or self.double_charges or self.stuck or not self.fired or not self.runs)


class Load:
    """K tenants × M agents submitting continuously (decision, slow and url runs).

    Each agent is a `dpp.client` that retries with the same Idempotency-Key, and
    waits for its run before the next one, as a well-behaved agent does. Faults of
    the trials land between these runs; the judge checks these tenants too.
    """

    def __init__(self, chaos: "Chaos", tenants: int, agents: int, url: str):
        self.chaos, self.url = chaos, url
        self.tenants = [chaos.tenant(topup_micros=100_000_000) for _ in range(tenants)]
        self.agents = agents
        self.submitted = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def active(self) -> bool:
        return bool(self._threads) and not self._stop.is_set()

    def start(self) -> None:
        self._stop.clear()
        for tenant_id, key in self.tenants:
            for n in range(self.agents):
                t = threading.Thread(target=self._agent, args=(key, n), daemon=True)
                t.start()
                self._threads.append(t)

    def stop(self, within: float = 15.0) -> None:
        """Stop the agents; wait for them `within` seconds in all (they are daemons: a
        SIGTERM's clean-up must not wait a minute per agent stuck in a retry)."""
        self._stop.set()
        deadline = time.monotonic() + within
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    def _agent(self, key: str, n: int) -> None:
        rng = random.Random(f"{key}-{n}")
        client = self.chaos.client(key)
        while not self._stop.is_set():
            pack, inputs = rng.choice([
                ("decision", DECISION), ("decision", {**DECISION, "method": "topsis"}),
                ("slow", {"seconds": 0.3}), ("url", {"url": self.url}),
            ])
            try:
                run = client.submit(pack, inputs, max_cost_usd="0.50")
                self.submitted += 1
                client.wait(run.run_id, timeout=90)
            except Exception as exc:  # the agent gives up on this run; the books must still balance
                if len(self.errors) < 50:
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                self._stop.wait(0.5)


class Chaos:
    def __init__(self, deps, platform: Platform, redis: OwnRedis, moto: OwnMoto, s3: OwnMoto, tokens: Path,
                 settings):
        self.deps, self.platform, self.redis, self.moto, self.tokens = deps, platform, redis, moto, tokens
        self.s3 = s3
        self.settings = settings
        self.load: Load | None = None
        self._prices: dict[str, int] = {}
        # One sweep-killing trial at a time. Its token kills whichever sweep reaches
        # the point first, so parallel trials of these points killed each other's
        # rescuing sweep in turn: 3 of 28 back-to-back trials (the >=1,000-trial run
        # at 0fa817d) settled past their bound, each run ended by the first sweep no
        # other trial's token was waiting for. The bound is for one fault.
        self._sweep_fault = threading.Lock()

    # -- the agent ---------------------------------------------------------------------

    def client(self, key: str):
        from dpp.client import DppClient

        return DppClient(self.platform.url, key, timeout=10, max_retries=12, backoff_base=0.3, backoff_max=3)

    def tenant(self, topup_micros: int = 10_000_000) -> tuple[str, str]:
        from dpp.services import ledger, tenants

        tenant_id = f"chaos-{uuid.uuid4().hex[:10]}"
        tenants.create_tenant(self.deps, tenant_id, "pro")
        key = tenants.issue_key(self.deps, tenant_id)
        ledger.topup(self.deps, tenant_id, topup_micros)
        return tenant_id, key

    def submit(self, key: str, pack: str = "decision", inputs: dict | None = None):
        body = DECISION if inputs is None else inputs
        return self.client(key).submit(pack, body, max_cost_usd="0.50")

    # -- one trial ---------------------------------------------------------------------

    def trial(self, point: str) -> Outcome:
        if any(part in SWEEP_POINTS for part in point.split("+")):
            with self._sweep_fault:
                return self._trial(point)
        return self._trial(point)

    def _trial(self, point: str) -> Outcome:
        tenant_id, key = self.tenant()
        started = time.monotonic()
        out = Outcome(point, under_load=self.load is not None and self.load.active, bound_sec=bound(point))
        armed: list[str] = []
        parts = point.split("+")
        actors = [threading.Thread(target=self._act, args=(part, tenant_id, key, armed, out)) for part in parts]
        watching = threading.Event()
        watcher = threading.Thread(target=self._watch_tokens, args=(armed, out, watching), daemon=True)
        watcher.start()
        for a in actors:
            a.start()
        for a in actors:
            a.join(bound(point) + 90)
        done = self._wait_settled(tenant_id, self._deadline(out, time.monotonic()))
        # A token the trial's own run did not reach (another trial's process took
        # it, or the run ended first): play the agent again until it fires.
        for _ in range(3):
            if not any(os.path.exists(t) for t in armed):
                break
            try:
                self.submit(key, "slow", {"seconds": 0.5})
            except Exception as exc:
                out.notes.append(f"agent: {type(exc).__name__}: {exc}")
            time.sleep(1.0)  # the run reaches its point (or not) before the clock is read
            done = self._wait_settled(tenant_id, self._deadline(out, time.monotonic()))
        watching.set()
        watcher.join(2)
        # Seconds from the first fault to every run settled: what the bound promises.
        out.seconds = time.monotonic() - min(out.fault_times or [started])
        unfired = [Path(t).name for t in armed if _disarm(t)]
        if unfired:
            out.fired = False
            out.notes.append(f"armed but never reached: {unfired}")
        if len(out.fault_times) < len(parts):
            out.fired = False
            out.notes.append(f"{len(out.fault_times)} of {len(parts)} faults happened")
        self._judge(tenant_id, out, done)
        return out

    def _deadline(self, out: Outcome, fallback: float) -> float:
        """The bound runs from the trial's last fault (a trial with two has two)."""
        return max(out.fault_times or [fallback]) + out.bound_sec

    @staticmethod
    def _watch_tokens(armed: list, out: Outcome, stop: threading.Event) -> None:
        """Stamp the moment a process took each armed token: that is when its fault fired."""
        seen: set = set()
        while True:
            stopping = stop.wait(0.05)
            for token in list(armed):
                if token not in seen and not os.path.exists(token):
                    seen.add(token)
                    out.fault_times.append(time.monotonic())
            if stopping:  # one last look: a token taken just before the stop counts
                return

    @staticmethod
    def _fault(out: Outcome) -> None:
        out.fault_times.append(time.monotonic())

    def _act(self, point: str, tenant_id: str, key: str, armed: list, out: Outcome) -> None:
        from dpp import faults

        # Tokens are scoped to the trial's tenant: under load, an unscoped
        # `after_reserve` was taken by a load agent's submission, and the trial's
        # tenant, whose recovery the bound is checked on, never saw its fault.
        def arm(name: str) -> None:
            armed.append(faults.arm(str(self.tokens), name, scope=tenant_id))

        try:
            if point in WORKER_POINTS or point in API_POINTS:
                arm(point)
                self.submit(key)
            elif point == "sweep_between_read_and_write":
                arm(point)
                self._kill_worker_mid_pack(key, out)
            elif point == "orphan_sweep_between_read_and_write":
                arm("after_reserve")
                arm(point)
                self.submit(key)
            elif point == "worker_sigkill":
                self._kill_worker_mid_pack(key, out)
            elif point == "worker_sigstop":
                # Frozen past its lease (a long GC pause, a stalled VM), then thawed:
                # the sweep has failed its run, and the thawed worker must not finalize it.
                self._pack_started(key, out)
                with self.platform.frozen("worker"):
                    self._fault(out)
                    time.sleep(LEASE_SEC + 2 * SWEEP_SEC + 1)
            elif point == "api_sigkill":
                timer = threading.Timer(random.uniform(0.0, 0.05),
                                        lambda: (self.platform.kill("api"), self._fault(out)))
                timer.start()
                self._agent(key, out)
                timer.join()
            elif point in ("redis_restart_with_data", "redis_restart_without_data"):
                self._agent(key, out, "slow", {"seconds": 1})
                time.sleep(random.uniform(0.0, 1.0))
                self.redis.restart(keep_data=point == "redis_restart_with_data")
                self._fault(out)
            elif point == "redis_flushall":
                self._agent(key, out, "slow", {"seconds": 1})
                time.sleep(random.uniform(0.0, 1.0))
                self.redis.flushall()
                self._fault(out)
            elif point == "pg_terminate_backends":
                self._agent(key, out, "slow", {"seconds": 1.5})
                for _ in range(3):
                    time.sleep(random.uniform(0.1, 0.6))
                    self._terminate_backends()
                    self._fault(out)
            elif point == "pg_restart":
                self._agent(key, out, "slow", {"seconds": 1.5})
                time.sleep(random.uniform(0.1, 1.0))
                restart_postgres()
                self._fault(out)
            elif point == "moto_restart":
                self._agent(key, out)
                time.sleep(random.uniform(0.0, 0.3))
                # The broker's moto is killed and restarted (queues and in-flight messages
                # gone); S3 is unreachable meanwhile but keeps its objects, as S3 does: in
                # one moto, a restart lost acknowledged results, and runs whose finalize
                # was cut after its Redis settle were judged against an envelope S3 never
                # loses (two AUDIT_REQUIRED in the >= 1,000-trial run at b908836).
                with self.moto.restarting, self.s3.frozen():
                    self.moto.restart()
                    self._fault(out)  # the fault is the restart, whatever happens next
                    self._recreate_aws()
            elif point == "message_redelivery":
                run = self.submit(key)
                self._wait_terminal(tenant_id, deadline=time.monotonic() + bound(point) + 30)
                for _ in range(2):
                    self.deps.queue.enqueue_run(run.run_id, "chaos-redelivery")
                # The fault happens when a worker takes the duplicates, which under load
                # waits its turn in the queue: the clock starts then, never before.
                if self._wait_dropped(run.run_id, 2, 90):
                    self._fault(out)
                else:
                    out.fired = False
                    out.notes.append("the duplicates were never delivered within 90 s")
            else:
                raise ValueError(point)
        except Exception as exc:  # the agent gave up: fine, as long as the money is right
            out.notes.append(f"agent: {type(exc).__name__}: {exc}")

    def _agent(self, key: str, out: Outcome, pack: str = "decision", inputs: dict | None = None):
        """Submit as the agent; a failed submission is noted, and the fault still happens."""
        try:
            return self.submit(key, pack, inputs)
        except Exception as exc:
            out.notes.append(f"agent: {type(exc).__name__}: {exc}")
            return None

    def _pack_started(self, key: str, out: Outcome) -> None:
        """Until a pack of this tenant runs (mid-pack is where the fault should land).

        A neighbour's fault may end the run before it starts (its worker killed or
        frozen): submit again. After 60 s the fault lands anyway, wherever it lands.
        """
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            run = self._agent(key, out, "slow", {"seconds": 2})
            while run is not None and time.monotonic() < deadline:
                if self._progress(run.run_id) > 0:
                    return
                if self._in_flight_run(run.run_id) is False:
                    break  # it ended without starting: another one
                time.sleep(0.1)
        out.notes.append("no pack of the trial started within 60 s; the fault landed anyway")

    def _kill_worker_mid_pack(self, key: str, out: Outcome) -> None:
        self._pack_started(key, out)
        self.platform.kill("worker")
        self._fault(out)

    def _in_flight_run(self, run_id: str) -> bool:
        from sqlalchemy import text

        with self.deps.db.transaction() as s:
            return s.execute(text("SELECT status IN ('QUEUED', 'PROCESSING') FROM runs WHERE id = :id"),
                             {"id": run_id}).scalar() is not False

    def _terminate_backends(self) -> None:
        from sqlalchemy import text
        from sqlalchemy.exc import OperationalError

        for attempt in range(5):  # a parallel trial may terminate this very connection first
            try:
                with self.deps.db.transaction() as s:
                    s.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
                return
            except OperationalError:
                if attempt == 4:
                    raise
                time.sleep(0.1)

    def _recreate_aws(self) -> None:
        make_queue(self.settings.sqs_queue_name, self.settings.aws_region, self.moto.url)
        make_queue(self.settings.sweeps_queue, self.settings.aws_region, self.moto.url)

    def _wait_dropped(self, run_id: str, copies: int, timeout: float) -> bool:
        """Until the worker logged `copies` deliveries of a finished run as dropped duplicates."""
        log = self.platform.logs / "worker.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(log, errors="replace") as f:
                seen = sum(1 for line in f if run_id in line and '"reason": "duplicate:' in line)
            if seen >= copies:
                return True
            time.sleep(0.1)
        return False

    def _progress(self, run_id: str) -> float:
        from sqlalchemy import text

        with self.deps.db.transaction() as s:
            return s.execute(text("SELECT progress FROM runs WHERE id = :id"), {"id": run_id}).scalar() or 0.0

    def _in_flight(self, tenant_id: str) -> int:
        from sqlalchemy import text

        with self.deps.db.transaction() as s:
            return s.execute(text("SELECT count(*) FROM runs WHERE tenant_id = :t AND (status IN ('QUEUED','PROCESSING') "
                                  "OR finalize_stage <> 'COMMITTED')"), {"t": tenant_id}).scalar()

    def _wait_terminal(self, tenant_id: str, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self._in_flight(tenant_id) == 0:
                return True
            time.sleep(0.25)
        return False

    def _wait_settled(self, tenant_ids, deadline: float) -> bool:
        """Every run terminal and every Redis hold accounted for (quiescent audit), by the deadline."""
        from dpp.services.audit import audit

        ids = [tenant_ids] if isinstance(tenant_ids, str) else list(tenant_ids)
        while True:
            checked_at = time.monotonic()
            try:
                if (all(self._in_flight(t) == 0 for t in ids)
                        and audit(self.deps, ids, quiescent=True).ok):
                    return checked_at <= deadline  # settled, but late is late
            except Exception:  # a service is being restarted under us
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)

    def expected_charge(self, pack_type: str, inputs, reserved: int) -> int:
        """The pack's deterministic price for these inputs (SPEC §5), capped at the reservation."""
        from dpp.domain.canonical import canonical_json

        key = pack_type + canonical_json(inputs).decode()
        if key not in self._prices:
            pack = self.deps.packs.get(pack_type)
            self._prices[key] = pack.run(pack.validate(inputs), lambda *_: None).actual_cost_micros
        return min(self._prices[key], reserved)

    def judge_tenants(self, tenant_ids: list, quiescent: bool) -> tuple[int, int, int, list]:
        """(leaks, double charges, stuck, notes) over these tenants' books and runs.

        A parallel trial may restart PostgreSQL or Redis, or terminate every
        connection of the database, the judge's own included: a read cut short
        that way is read again (for up to a minute), never taken as a verdict.
        """
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
        from sqlalchemy.exc import DBAPIError

        from dpp.domain.errors import DependencyUnavailable

        deadline = time.monotonic() + 60
        while True:
            try:
                return self._judge_tenants_once(tenant_ids, quiescent)
            except (DBAPIError, RedisConnectionError, RedisTimeoutError, DependencyUnavailable):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _judge_tenants_once(self, tenant_ids: list, quiescent: bool) -> tuple[int, int, int, list]:
        from sqlalchemy import text

        from dpp.domain.runs import ErrorCode
        from dpp.services.audit import audit

        leaks = doubles = stuck = 0
        notes: list = []
        report = audit(self.deps, tenant_ids, quiescent=quiescent)
        money = [v for v in report.violations if "AUDIT_REQUIRED" not in v]
        leaks += len({v.split(":")[0].split("/")[0] for v in money})
        notes += money[:10]
        never_started = {ErrorCode.QUEUE_TIMEOUT.value, ErrorCode.ENQUEUE_FAILED.value, ErrorCode.CANCELED.value}
        with self.deps.db.transaction() as s:
            rows = s.execute(text(
                "SELECT r.id, r.tenant_id, r.status, r.money_state, r.reserved_micros, r.minimum_fee_micros, "
                "  r.pack_type, r.inputs, r.error_code, r.started_at, "
                "  count(t.id) FILTER (WHERE t.kind = 'CHARGE') AS charges, "
                "  coalesce(sum(t.amount_micros) FILTER (WHERE t.kind = 'CHARGE'), 0) AS charged "
                "FROM runs r LEFT JOIN ledger_transfers t ON t.run_id = r.id WHERE r.tenant_id = ANY(:t) GROUP BY r.id"),
                {"t": list(tenant_ids)}).mappings().all()
        for row in rows:
            receipt = self.deps.budget.receipt(row["tenant_id"], str(row["id"]))
            if row["status"] not in ("COMPLETED", "FAILED") or row["money_state"] != "SETTLED":
                if quiescent or row["money_state"] == "AUDIT_REQUIRED":
                    stuck += 1
                    notes.append(f"{row['id']}: {row['status']}/{row['money_state']}")
                continue
            if row["status"] == "COMPLETED":
                try:
                    want = self.expected_charge(row["pack_type"], row["inputs"], row["reserved_micros"])
                except Exception as exc:  # the judge could not price it: say so, never crash the run
                    notes.append(f"{row['id']}: could not price {row['pack_type']}: {exc}")
                    doubles += 1
                    continue
            elif row["error_code"] in never_started or row["started_at"] is None:
                want = 0
            else:
                want = min(row["minimum_fee_micros"], row["reserved_micros"])
            if row["charges"] != 1 or row["charged"] != want or (receipt and receipt["charge"] != row["charged"]):
                doubles += 1
                notes.append(f"{row['id']}: {row['status']}/{row['error_code']} charges={row['charges']} "
                             f"charged={row['charged']} expected={want} receipt={receipt}")
        return leaks, doubles, stuck, notes

    def _judge(self, tenant_id: str, out: Outcome, done: bool) -> None:
        from sqlalchemy import text

        with self.deps.db.transaction() as s:
            out.runs = s.execute(text("SELECT count(*) FROM runs WHERE tenant_id = :t"), {"t": tenant_id}).scalar()
        if not out.runs:
            out.notes.append("no run was recorded: the trial proved nothing")
        # Its own tenant, quiescent: the bound has passed, nothing may be pending.
        out.leaks, out.double_charges, out.stuck, notes = self.judge_tenants([tenant_id], quiescent=True)
        out.notes += notes
        if not done:
            out.notes.append(f"not settled within its bound of {out.bound_sec:.0f} s")
            out.stuck = max(out.stuck, 1)
        # Every other tenant, as it stands (others' trials and the load are still running).
        others = self._all_tenants() - {tenant_id}
        leaks, doubles, _, notes = self.judge_tenants(sorted(others), quiescent=False)
        if leaks or doubles:
            out.leaks += leaks
            out.double_charges += doubles
            out.notes += [f"another tenant, seen after this trial: {n}" for n in notes]

    def _all_tenants(self) -> set:
        from sqlalchemy import text

        with self.deps.db.transaction() as s:
            return set(s.execute(text("SELECT id FROM tenants")).scalars())


# --------------------------------------------------------------------------------------
# Glue
# --------------------------------------------------------------------------------------

def _disarm(token: str) -> bool:
    """Remove a token that did not fire (it must not fire later); True if it was still armed."""
    try:
        os.remove(token)
        return True
    except FileNotFoundError:
        return False


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def make_queue(name: str, region: str, endpoint: str) -> str:
    url = devstack.ensure_queue(name, region, endpoint)
    sqs = devstack._aws_client("sqs", region, endpoint)
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": str(VISIBILITY_SEC)})
    return url


def progress_bar(done: int, total: int, point: str, bad: int) -> None:
    width = 30
    filled = int(width * done / total) if total else width
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}  {point:<38} failures {bad}")
    sys.stderr.flush()


def table(report: dict) -> str:
    head = (f"{'fault point':<46}{'trials':>7}{'load':>6}{'fired':>7}{'leaks':>7}{'double':>8}{'stuck':>7}"
            f"{'max s':>7}{'bound':>7}")
    lines = [head, "-" * len(head)]
    for fp in report["fault_points"]:
        lines.append(f"{fp['name']:<46}{fp['trials']:>7}{fp['trials_under_load']:>6}{fp['faults_fired']:>7}"
                     f"{fp['leaks']:>7}{fp['double_charges']:>8}{fp['stuck']:>7}"
                     f"{fp['max_seconds_to_terminal']:>7.1f}{fp['bound_sec']:>7.0f}")
    lines.append("-" * len(head))
    fired = sum(fp["faults_fired"] for fp in report["fault_points"])
    lines.append(f"{'total':<46}{report['trials']:>7}{report['trials_under_load']:>6}{fired:>7}{report['leaks']:>7}"
                 f"{report['double_charges']:>8}{report['stuck']:>7}")
    f = report["final_judgement"]
    lines.append(f"final judgement of all {f.get('tenants', 0)} tenants: leaks {f['leaks']}, double charges "
                 f"{f['double_charges']}, stuck {f['stuck']}; load runs {f.get('load_runs', 0)}")
    lines.append(f"overlapping trials {report['trials_overlapping']}; unfired {report['unfired']}; "
                 f"trials with no run {report['empty_trials']}")
    lines.append(f"max seconds from fault to settled: {report['max_seconds_to_terminal']:.1f}")
    return "\n".join(lines)


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=int(os.environ.get("CHAOS_TRIALS", "3")),
                        help="trials per fault point, alone (CHAOS_TRIALS)")
    parser.add_argument("--load-trials", type=int, default=None,
                        help="trials per fault point under multi-tenant load (default: --trials)")
    parser.add_argument("--pair-trials", type=int, default=None,
                        help="trials per pair of overlapping faults (default: --trials)")
    parser.add_argument("--load", default=os.environ.get("CHAOS_LOAD", "3x2"),
                        help="tenants x agents submitting during the load phase (CHAOS_LOAD)")
    parser.add_argument("--points", default="", help="comma-separated subset of fault points")
    parser.add_argument("--pairs", default=None, help="comma-separated pairs (a+b); default: all")
    parser.add_argument("--load-points", default="", help="points for the load phase; default: --points")
    parser.add_argument("--report", default=str(ROOT / "build" / "chaos-report.json"))
    parser.add_argument("--seed", type=int, default=20261122)
    parser.add_argument("--parallel", type=int, default=int(os.environ.get("CHAOS_PARALLEL", "3")),
                        help="trials of the same fault point run at once, each on its own tenant")
    args = parser.parse_args(argv)
    random.seed(args.seed)
    points = [p for p in args.points.split(",") if p] or ALL
    pairs = PAIRS if args.pairs is None else [p for p in args.pairs.split(",") if p]
    load_points = [p for p in args.load_points.split(",") if p] or points
    unknown = {x for p in points + pairs + load_points for x in p.split("+")} - set(ALL)
    if unknown:
        parser.error(f"unknown fault points: {sorted(unknown)}")
    load_trials = args.trials if args.load_trials is None else args.load_trials
    pair_trials = args.trials if args.pair_trials is None else args.pair_trials
    load_tenants, load_agents = (int(x) for x in args.load.lower().split("x"))

    # SIGTERM (a CI timeout, kill) must still stop every process and service we started.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(143)))
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=_mkdir(STATE)))
    tokens = _mkdir(run_dir / "tokens")
    redis, moto, s3 = OwnRedis(run_dir / "redis"), OwnMoto(run_dir / "moto"), OwnMoto(run_dir / "s3")
    stack = platform = pages = load = None
    try:
        redis.start()
        moto.start()
        s3.start()
        pages = PageServer()
        queue = f"dpp-chaos-{uuid.uuid4().hex[:6]}"
        os.environ.update({
            "DATABASE_URL": f"postgresql+psycopg2://postgres@127.0.0.1:{devstack.free_port()}/dpp_chaos",
            "REDIS_URL": redis.url, "SQS_ENDPOINT_URL": moto.url, "S3_ENDPOINT_URL": s3.url,
            "SQS_QUEUE_NAME": queue, "S3_RESULT_BUCKET": "dpp-chaos-results",
        })
        os.environ.pop("SQS_QUEUE_URL", None)
        # A private PostgreSQL: the runner terminates its backends, never the machine's.
        stack = devstack.Stack().up()
        # Every tenant is judged, so the database starts empty: no tenant of an
        # earlier run (whose Redis is gone with that run) may be judged here.
        devstack._pg_ensure_database(stack.env["DATABASE_URL"], fresh=True)
        # devstack's private cluster trades durability for speed (synchronous_commit off);
        # pg_restart crashes it, and a commit acknowledged to the agent must survive
        # that, as it does on any production PostgreSQL. fsync may stay off: the OS
        # keeps what was written across a process crash.
        devstack._pg_query(stack.env["DATABASE_URL"], "ALTER DATABASE dpp_chaos SET synchronous_commit = on")
        queue_url = make_queue(queue, stack.env["AWS_REGION"], moto.url)
        make_queue(f"{queue}-sweeps", stack.env["AWS_REGION"], moto.url)
        env = stack.child_env(
            SQS_QUEUE_URL=queue_url, DPP_FAULT_TOKENS=str(tokens), DPP_JSON_LOGS="1", PYTHONPATH=str(ROOT),
            DPP_EXTRA_PACKS="tests.support.packs:SlowPack", DPP_REDBEAT_KEY_PREFIX=f"dpp:redbeat:{queue}",
            WORKER_LEASE_TTL_SEC=str(LEASE_SEC), WORKER_HEARTBEAT_INTERVAL_SEC=str(HEARTBEAT_SEC),
            WORKER_VISIBILITY_TIMEOUT_SEC=str(VISIBILITY_SEC), REAPER_INTERVAL_SEC=str(SWEEP_SEC),
            RECONCILE_INTERVAL_SEC=str(SWEEP_SEC), MIRROR_WATCH_INTERVAL_SEC=str(WATCH_SEC),
            RECONCILE_THRESHOLD_MIN=str(THRESHOLD_SEC / 60), REAPER_QUEUED_TIMEOUT_SEC=str(QUEUED_TIMEOUT_SEC),
            REAPER_REDRIVE_ATTEMPTS=str(REDRIVE_ATTEMPTS),
            REAPER_ORPHAN_HOLD_GRACE_SEC=str(ORPHAN_GRACE_SEC), AUDIT_INTERVAL_SEC="10",
            DPP_URL_ALLOWLIST="127.0.0.1/32",
        )
        devstack.migrate(stack)
        os.environ.update(env)
        os.environ.pop("DPP_FAULT_TOKENS")  # the runner itself never dies at a fault point
        from dpp.bootstrap import deps
        from dpp.config import Settings, reset_settings
        from dpp.services.tenants import seed_plans

        reset_settings()
        d = deps()
        seed_plans(d, extra_pack_types=("slow",))
        platform = Platform(env, _mkdir(run_dir / "logs"))
        platform.up()
        chaos = Chaos(d, platform, redis, moto, s3, tokens, Settings.from_env())
        phases = [("alone", points, args.trials), ("under load", load_points, load_trials), ("overlapping", pairs, pair_trials)]
        total = sum(len(p) * n for _, p, n in phases)
        say(f"chaos: {total} trials ({len(points)} points × {args.trials} alone, × {load_trials} under "
            f"{load_tenants}×{load_agents} load; {len(pairs)} pairs × {pair_trials}); logs in {run_dir}")

        results: dict[str, list[Outcome]] = {}
        done, bad = 0, 0
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            for phase, names, trials in phases:
                if not trials or not names:
                    continue
                if phase == "under load":
                    chaos.expected_charge("url", {"url": pages.url}, 10**9)  # priced while the page is up
                    load = Load(chaos, load_tenants, load_agents, pages.url)
                    chaos.load = load
                    load.start()
                elif load is not None:
                    load.stop()
                    chaos.load = None
                for name in names:
                    remaining = trials
                    while remaining:
                        batch = min(remaining, max(1, args.parallel))
                        progress_bar(done, total, f"{name} ({phase})", bad)
                        for outcome in pool.map(chaos.trial, [name] * batch):
                            results.setdefault(name, []).append(outcome)
                            done += 1
                            if outcome.failed:
                                bad += 1
                                say(f"\n✗ {name} ({phase}): {outcome.notes}")
                        remaining -= batch
        if load is not None:
            load.stop()
        progress_bar(done, total, "done", bad)
        say("")

        # The run's end: every tenant, quiescent, after the largest bound.
        final_bound = max([bound(n) for n in points + pairs + load_points] + [0.0])
        tenants = sorted(chaos._all_tenants())
        settled = chaos._wait_settled(tenants, time.monotonic() + final_bound)
        final = dict(zip(("leaks", "double_charges", "stuck"), chaos.judge_tenants(tenants, quiescent=True)[:3]))
        final.update(tenants=len(tenants), settled_within_sec=final_bound if not settled else None,
                     load_runs=load.submitted if load else 0, load_agent_errors=(load.errors[:10] if load else []))
        if not settled:
            final["stuck"] = max(final["stuck"], 1)

        report = build_report(results, platform.restarts, final)
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        print(table(report))
        print(f"report: {args.report}")
        failed = (report["leaks"] or report["double_charges"] or report["stuck"] or report["unfired"]
                  or report["empty_trials"])
        return 1 if failed else 0
    finally:
        if load is not None:
            load.stop()
        if platform is not None:
            platform.down()
        if pages is not None:
            pages.stop()
        moto.stop()
        s3.stop()
        redis.stop()
        if stack is not None:
            stack.down()


class PageServer:
    """A local page for the url pack's runs under load (loopback, allow-listed for the run)."""

    BODY = (b"<html><head><title>DPP chaos page</title><meta name='description' content='a page'>"
            b"</head><body><p>Money is never lost.</p><a href='/next'>next</a></body></html>")

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        body = self.BODY

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/page"

    def stop(self) -> None:
        self.server.shutdown()


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def build_report(results: dict, restarts: dict, final: dict | None = None) -> dict:
    fault_points = []
    for name, outcomes in results.items():
        fault_points.append({
            "name": name,
            "trials": len(outcomes),
            "trials_under_load": sum(o.under_load for o in outcomes),
            "leaks": sum(o.leaks for o in outcomes),
            "double_charges": sum(o.double_charges for o in outcomes),
            "stuck": sum(o.stuck for o in outcomes),
            "faults_fired": sum(o.fired for o in outcomes),
            "empty_trials": sum(not o.runs for o in outcomes),
            "max_seconds_to_terminal": round(max((o.seconds for o in outcomes), default=0.0), 2),
            "bound_sec": bound(name),
            "failures": [o.notes for o in outcomes if o.failed][:5],
        })
    final = final or {"leaks": 0, "double_charges": 0, "stuck": 0}
    return {
        "commit": _commit(),
        "trials": sum(fp["trials"] for fp in fault_points),
        "trials_under_load": sum(fp["trials_under_load"] for fp in fault_points),
        "trials_overlapping": sum(fp["trials"] for fp in fault_points if "+" in fp["name"]),
        "leaks": sum(fp["leaks"] for fp in fault_points) + final["leaks"],
        "double_charges": sum(fp["double_charges"] for fp in fault_points) + final["double_charges"],
        "stuck": sum(fp["stuck"] for fp in fault_points) + final["stuck"],
        "unfired": sum(fp["trials"] - fp["faults_fired"] for fp in fault_points),
        "empty_trials": sum(fp["empty_trials"] for fp in fault_points),
        "max_seconds_to_terminal": max((fp["max_seconds_to_terminal"] for fp in fault_points), default=0.0),
        "final_judgement": final,
        "timers": {"lease_sec": LEASE_SEC, "heartbeat_sec": HEARTBEAT_SEC, "visibility_sec": VISIBILITY_SEC,
                   "reconcile_threshold_sec": THRESHOLD_SEC, "queued_timeout_sec": QUEUED_TIMEOUT_SEC,
                   "redrive_attempts": REDRIVE_ATTEMPTS, "orphan_grace_sec": ORPHAN_GRACE_SEC,
                   "sweep_interval_sec": SWEEP_SEC, "mirror_watch_sec": WATCH_SEC, "restart_sec": RESTART_SEC},
        "process_restarts": restarts,
        "fault_points": fault_points,
    }


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
