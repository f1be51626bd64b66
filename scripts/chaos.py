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

ROOT = devstack.ROOT
BIN = devstack.VENV_BIN
STATE = devstack.LOCAL / "chaos"

LEASE_SEC, HEARTBEAT_SEC, VISIBILITY_SEC = 3, 1, 5
THRESHOLD_SEC, QUEUED_TIMEOUT_SEC, ORPHAN_GRACE_SEC = 3, 8, 3
TRIAL_DEADLINE_SEC = 60

WORKER_POINTS = ["after_lease_claim", "mid_pack", "after_finalize_claim", "after_s3_upload",
                 "after_redis_settle", "after_ledger_commit"]
API_POINTS = ["after_reserve", "after_run_row", "after_enqueue"]
SWEEP_POINTS = ["sweep_between_read_and_write", "orphan_sweep_between_read_and_write"]
DISRUPTIONS = ["worker_sigkill", "api_sigkill", "redis_restart_with_data", "redis_restart_without_data",
               "pg_terminate_backends", "moto_restart", "message_redelivery"]
ALL = WORKER_POINTS + API_POINTS + SWEEP_POINTS + DISRUPTIONS

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
        self.proc.send_signal(signal.SIGKILL)  # no clean shutdown: the AOF is all it keeps
        self.proc.wait(10)
        if not keep_data:
            for child in self.home.iterdir():
                if child.name != "redis.log":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            devstack.stop_process(self.proc)


class OwnMoto:
    def __init__(self, home: Path):
        self.home, self.port, self.proc = home, devstack.free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.proc = devstack.start_process([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                           log_path=self.home / "moto.log")
        wait(lambda: devstack.http_answers(self.url, timeout=1), 30, "moto to answer")

    def restart(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.start()

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
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _args(self, role: str) -> list[str]:
        return {
            "api": [str(BIN / "gunicorn"), "-b", f"127.0.0.1:{self.port}", "-w", "2", "--timeout", "30",
                    "dpp.api:create_app()"],
            "worker": [str(BIN / "celery"), "-A", "dpp", "worker", "-l", "INFO", "-c", "2", "-n", f"chaos-{uuid.uuid4().hex[:4]}@%h",
                       "--without-gossip", "--without-mingle", "--without-heartbeat"],
            "beat": [str(BIN / "celery"), "-A", "dpp", "beat", "-l", "INFO", "-s", str(self.logs / "beat-schedule")],
        }[role]

    def start(self, role: str) -> None:
        with self._lock:
            log = self.logs / f"{role}.log"
            self.procs[role] = devstack.start_process(self._args(role), env=self.env, log_path=log, cwd=ROOT)

    def up(self) -> None:
        for role in ("api", "worker", "beat"):
            self.start(role)
        wait(lambda: devstack.http_answers(f"{self.url}/health", timeout=1, status=200), 60, "the API")
        threading.Thread(target=self._supervise, daemon=True).start()

    def kill(self, role: str) -> None:
        with self._lock:
            proc = self.procs[role]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
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
    leaks: int = 0
    double_charges: int = 0
    stuck: int = 0
    seconds: float = 0.0
    fired: bool = True  # False when an armed fault point was never reached
    notes: list = field(default_factory=list)


class Chaos:
    def __init__(self, deps, platform: Platform, redis: OwnRedis, moto: OwnMoto, tokens: Path, settings):
        self.deps, self.platform, self.redis, self.moto, self.tokens = deps, platform, redis, moto, tokens
        self.settings = settings

    # -- the agent ---------------------------------------------------------------------

    def client(self, key: str):
        from dpp.client import DppClient

        return DppClient(self.platform.url, key, timeout=10, max_retries=12, backoff_base=0.3, backoff_max=3)

    def tenant(self) -> tuple[str, str]:
        from dpp.services import ledger, tenants

        tenant_id = f"chaos-{uuid.uuid4().hex[:10]}"
        tenants.create_tenant(self.deps, tenant_id, "pro")
        key = tenants.issue_key(self.deps, tenant_id)
        ledger.topup(self.deps, tenant_id, 10_000_000)
        return tenant_id, key

    def submit(self, key: str, pack: str = "decision", inputs: dict | None = None):
        body = DECISION if inputs is None else inputs
        return self.client(key).submit(pack, body, max_cost_usd="0.50")

    # -- one trial ---------------------------------------------------------------------

    def trial(self, point: str) -> Outcome:
        from dpp import faults

        tenant_id, key = self.tenant()
        started = time.monotonic()
        out = Outcome(point)
        armed: list[str] = []
        try:
            if point in WORKER_POINTS or point in API_POINTS:
                armed.append(faults.arm(str(self.tokens), point))
                self.submit(key)
            elif point == "sweep_between_read_and_write":
                armed.append(faults.arm(str(self.tokens), point))
                self._kill_worker_mid_pack(key)
            elif point == "orphan_sweep_between_read_and_write":
                armed.append(faults.arm(str(self.tokens), "after_reserve"))
                armed.append(faults.arm(str(self.tokens), point))
                self.submit(key)
            elif point == "worker_sigkill":
                self._kill_worker_mid_pack(key)
            elif point == "api_sigkill":
                timer = threading.Timer(random.uniform(0.0, 0.05), self.platform.kill, args=("api",))
                timer.start()
                self.submit(key)
                timer.join()
            elif point in ("redis_restart_with_data", "redis_restart_without_data"):
                self.submit(key, "slow", {"seconds": 1})
                time.sleep(random.uniform(0.0, 1.0))
                self.redis.restart(keep_data=point == "redis_restart_with_data")
            elif point == "pg_terminate_backends":
                self.submit(key, "slow", {"seconds": 1.5})
                for _ in range(3):
                    time.sleep(random.uniform(0.1, 0.6))
                    self._terminate_backends()
            elif point == "moto_restart":
                self.submit(key)
                time.sleep(random.uniform(0.0, 0.3))
                self.moto.restart()
                self._recreate_aws()
            elif point == "message_redelivery":
                run = self.submit(key)
                self._wait_terminal(tenant_id, deadline=started + TRIAL_DEADLINE_SEC)
                for _ in range(2):
                    self.deps.queue.enqueue_run(run.run_id, "chaos-redelivery")
            else:
                raise ValueError(point)
        except Exception as exc:  # the agent gave up: fine, as long as the money is right
            out.notes.append(f"agent: {type(exc).__name__}: {exc}")
        done = self._wait_settled(tenant_id, deadline=started + TRIAL_DEADLINE_SEC)
        out.seconds = time.monotonic() - started
        unfired = [Path(t).name for t in armed if _disarm(t)]
        if unfired:
            # With trials in parallel another trial's process may have taken this
            # trial's token: counted as not fired here, fired twice there.
            out.fired = False
            out.notes.append(f"armed but never reached: {unfired}")
        self._judge(tenant_id, out, done)
        return out

    def _kill_worker_mid_pack(self, key: str) -> None:
        run = self.submit(key, "slow", {"seconds": 2})
        wait(lambda: self._progress(run.run_id) > 0, 20, "the pack to start")
        self.platform.kill("worker")

    def _terminate_backends(self) -> None:
        from sqlalchemy import text

        with self.deps.db.transaction() as s:
            s.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND pid <> pg_backend_pid()"))

    def _recreate_aws(self) -> None:
        devstack.ensure_bucket(self.settings.s3_result_bucket, self.settings.aws_region, self.moto.url)
        make_queue(self.settings.sqs_queue_name, self.settings.aws_region, self.moto.url)

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

    def _wait_settled(self, tenant_id: str, deadline: float) -> bool:
        """Every run terminal and Redis agreeing with the ledger (orphans released, mirrors restored)."""
        from dpp.services.audit import audit

        while time.monotonic() < deadline:
            try:
                if (self._in_flight(tenant_id) == 0 and not self.deps.budget.holds(tenant_id)
                        and audit(self.deps, [tenant_id]).ok):
                    return True
            except Exception:  # a service is being restarted under us
                pass
            time.sleep(0.25)
        return False

    def _judge(self, tenant_id: str, out: Outcome, done: bool) -> None:
        from sqlalchemy import text

        from dpp.services.audit import audit

        report = audit(self.deps, [tenant_id])
        for violation in report.violations:
            out.notes.append(violation)
        with self.deps.db.transaction() as s:
            rows = s.execute(text(
                "SELECT r.id, r.status, r.money_state, r.reserved_micros, "
                "  count(t.id) FILTER (WHERE t.kind = 'CHARGE') AS charges, "
                "  coalesce(sum(t.amount_micros) FILTER (WHERE t.kind = 'CHARGE'), 0) AS charged "
                "FROM runs r LEFT JOIN ledger_transfers t ON t.run_id = r.id WHERE r.tenant_id = :t GROUP BY r.id"),
                {"t": tenant_id}).mappings().all()
        for row in rows:
            receipt = self.deps.budget.receipt(tenant_id, str(row["id"]))
            if row["charges"] > 1 or row["charged"] > row["reserved_micros"] or (
                receipt and row["charges"] == 1 and receipt["charge"] != row["charged"]
            ):
                out.double_charges += 1
                out.notes.append(f"{row['id']}: charges={row['charges']} charged={row['charged']} receipt={receipt}")
            if row["status"] not in ("COMPLETED", "FAILED") or row["money_state"] != "SETTLED":
                out.stuck += 1
                out.notes.append(f"{row['id']}: {row['status']}/{row['money_state']} after {out.seconds:.1f}s")
        # Every run is over, so any Redis hold left is one nobody will release.
        for run_id, amount, _ in self.deps.budget.holds(tenant_id):
            report.violations.append(f"{tenant_id}/{run_id}: Redis still holds {amount}")
        money_violations = [v for v in report.violations if "AUDIT_REQUIRED" not in v and "RESERVE" not in v]
        if money_violations:
            out.leaks += 1
        if not done and not out.stuck and not money_violations:
            out.notes.append("did not settle in time, but the books balance")


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
    head = f"{'fault point':<38}{'trials':>7}{'fired':>7}{'leaks':>7}{'double':>8}{'stuck':>7}{'max s':>7}"
    lines = [head, "-" * len(head)]
    for fp in report["fault_points"]:
        lines.append(f"{fp['name']:<38}{fp['trials']:>7}{fp['faults_fired']:>7}{fp['leaks']:>7}"
                     f"{fp['double_charges']:>8}{fp['stuck']:>7}{fp['max_seconds_to_terminal']:>7.1f}")
    lines.append("-" * len(head))
    fired = sum(fp["faults_fired"] for fp in report["fault_points"])
    lines.append(f"{'total':<38}{report['trials']:>7}{fired:>7}{report['leaks']:>7}"
                 f"{report['double_charges']:>8}{report['stuck']:>7}")
    lines.append(f"max seconds from fault to settled: {report['max_seconds_to_terminal']:.1f}")
    return "\n".join(lines)


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=int(os.environ.get("CHAOS_TRIALS", "3")),
                        help="trials per fault point (CHAOS_TRIALS)")
    parser.add_argument("--points", default="", help="comma-separated subset of fault points")
    parser.add_argument("--report", default=str(ROOT / "build" / "chaos-report.json"))
    parser.add_argument("--seed", type=int, default=20261122)
    parser.add_argument("--parallel", type=int, default=int(os.environ.get("CHAOS_PARALLEL", "3")),
                        help="trials of the same fault point run at once, each on its own tenant")
    args = parser.parse_args(argv)
    random.seed(args.seed)
    points = [p for p in args.points.split(",") if p] or ALL
    unknown = set(points) - set(ALL)
    if unknown:
        parser.error(f"unknown fault points: {sorted(unknown)}")

    # SIGTERM (a CI timeout, kill) must still stop every process and service we started.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(143)))
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=_mkdir(STATE)))
    tokens = _mkdir(run_dir / "tokens")
    redis, moto = OwnRedis(run_dir / "redis"), OwnMoto(run_dir / "moto")
    stack = platform = None
    try:
        redis.start()
        moto.start()
        queue = f"dpp-chaos-{uuid.uuid4().hex[:6]}"
        os.environ.update({
            "DATABASE_URL": f"postgresql+psycopg2://postgres@127.0.0.1:{devstack.free_port()}/dpp_chaos",
            "REDIS_URL": redis.url, "SQS_ENDPOINT_URL": moto.url, "S3_ENDPOINT_URL": moto.url,
            "SQS_QUEUE_NAME": queue, "S3_RESULT_BUCKET": "dpp-chaos-results",
        })
        os.environ.pop("SQS_QUEUE_URL", None)
        # A private PostgreSQL: the runner terminates its backends, never the machine's.
        stack = devstack.Stack().up()
        queue_url = make_queue(queue, stack.env["AWS_REGION"], moto.url)
        env = stack.child_env(
            SQS_QUEUE_URL=queue_url, DPP_FAULT_TOKENS=str(tokens), DPP_JSON_LOGS="1", PYTHONPATH=str(ROOT),
            DPP_EXTRA_PACKS="tests.support.packs:SlowPack", DPP_REDBEAT_KEY_PREFIX=f"dpp:redbeat:{queue}",
            WORKER_LEASE_TTL_SEC=str(LEASE_SEC), WORKER_HEARTBEAT_INTERVAL_SEC=str(HEARTBEAT_SEC),
            WORKER_VISIBILITY_TIMEOUT_SEC=str(VISIBILITY_SEC), REAPER_INTERVAL_SEC="1", RECONCILE_INTERVAL_SEC="1",
            RECONCILE_THRESHOLD_MIN=str(THRESHOLD_SEC / 60), REAPER_QUEUED_TIMEOUT_SEC=str(QUEUED_TIMEOUT_SEC),
            REAPER_ORPHAN_HOLD_GRACE_SEC=str(ORPHAN_GRACE_SEC), AUDIT_INTERVAL_SEC="2",
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
        say(f"chaos: {len(points)} fault points × {args.trials} trials; logs in {run_dir}")

        chaos = Chaos(d, platform, redis, moto, tokens, Settings.from_env())
        results: dict[str, list[Outcome]] = {p: [] for p in points}
        total, done, bad = len(points) * args.trials, 0, 0
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            for point in points:
                remaining = args.trials
                while remaining:
                    batch = min(remaining, max(1, args.parallel))
                    progress_bar(done, total, point, bad)
                    for outcome in pool.map(chaos.trial, [point] * batch):
                        results[point].append(outcome)
                        done += 1
                        if outcome.leaks or outcome.double_charges or outcome.stuck:
                            bad += 1
                            say(f"\n✗ {point}: {outcome.notes}")
                    remaining -= batch
        progress_bar(done, total, "done", bad)
        say("")

        report = build_report(results, platform.restarts)
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        print(table(report))
        print(f"report: {args.report}")
        return 1 if (report["leaks"] or report["double_charges"] or report["stuck"]) else 0
    finally:
        if platform is not None:
            platform.down()
        moto.stop()
        redis.stop()
        if stack is not None:
            stack.down()


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def build_report(results: dict, restarts: dict) -> dict:
    fault_points = []
    for name, outcomes in results.items():
        fault_points.append({
            "name": name,
            "trials": len(outcomes),
            "leaks": sum(o.leaks for o in outcomes),
            "double_charges": sum(o.double_charges for o in outcomes),
            "stuck": sum(o.stuck for o in outcomes),
            "faults_fired": sum(o.fired for o in outcomes),
            "max_seconds_to_terminal": round(max((o.seconds for o in outcomes), default=0.0), 2),
            "failures": [o.notes for o in outcomes if o.leaks or o.double_charges or o.stuck][:5],
        })
    return {
        "commit": _commit(),
        "trials": sum(fp["trials"] for fp in fault_points),
        "leaks": sum(fp["leaks"] for fp in fault_points),
        "double_charges": sum(fp["double_charges"] for fp in fault_points),
        "stuck": sum(fp["stuck"] for fp in fault_points),
        "max_seconds_to_terminal": max((fp["max_seconds_to_terminal"] for fp in fault_points), default=0.0),
        "process_restarts": restarts,
        "fault_points": fault_points,
    }


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
