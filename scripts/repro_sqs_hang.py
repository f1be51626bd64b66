"""Does a worker still consume after SQS restarts back to back? (the chaos runner's hang)

Starts a moto_server of its own on a free port, the runs and sweeps queues as
the chaos runner makes them, and one `celery -A dpp worker` with the chaos
sweeper's flags on the sweeps queue. Then restarts moto (SIGKILL, start on the
same port, queues again) `--restarts` times, publishes one task and waits for
the worker to receive it. Exit 0 if it did, 1 if the worker went silent.

    .venv/bin/python scripts/repro_sqs_hang.py --restarts 2

Stops no shared service: moto is its own (SIGKILLed by PID); the worker's
DATABASE_URL and REDIS_URL (DB 11) default to scratch names, and only the
task's receipt is checked, not its outcome. Before the fix in
dpp/adapters/kombu_sqs.py the worker logs "Cannot connect … Trying again",
"Connected", "Error in timer: cannot invoke info_read() - no multi handle",
and nothing after; tests/e2e/test_broker_restarts.py is the same scenario as
a test.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import devstack  # noqa: E402

BIN = Path(sys.executable).parent
REGION = "us-east-1"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Moto:
    def __init__(self, logs: Path):
        self.port, self.logs, self.proc = devstack.free_port(), logs, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = devstack.start_process([BIN / "moto_server", "-H", "127.0.0.1", "-p", self.port],
                                           log_path=self.logs / "moto.log")
        deadline = time.monotonic() + 60
        while not devstack.http_answers(self.url, timeout=1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto_server did not come up")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def received(log: Path, task_id: str) -> bool:
    return f"[{task_id}] received" in log.read_text(errors="replace")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--gap", type=float, default=0.5, help="seconds between one restart's end and the next kill")
    p.add_argument("--settle", type=float, default=8.0, help="seconds after the last restart before publishing")
    p.add_argument("--wait", type=float, default=20.0, help="seconds to wait for the worker to receive the task")
    p.add_argument("--down", type=float, default=2.0, help="seconds moto stays down in each restart")
    p.add_argument("--idle", type=int, default=3,
                   help="DPP_BROKER_QUEUE_IDLE_SEC: the worker tags its mailbox every third of it, a "
                        "synchronous SQS call that meets the outage like an ack or a sweep would")
    p.add_argument("--logs", default=None)
    args = p.parse_args(argv)

    logs = Path(args.logs or f"/tmp/repro-sqs-hang-{uuid.uuid4().hex[:6]}")
    logs.mkdir(parents=True, exist_ok=True)
    queue = f"dpp-hang-{uuid.uuid4().hex[:6]}"
    moto = Moto(logs)
    moto.start()

    def make_queues() -> None:
        devstack.ensure_queue(queue, REGION, moto.url)
        devstack.ensure_queue(f"{queue}-sweeps", REGION, moto.url)

    make_queues()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SQS_ENDPOINT_URL": moto.url, "S3_ENDPOINT_URL": moto.url, "SQS_QUEUE_NAME": queue,
        "AWS_REGION": REGION,
        "DATABASE_URL": os.environ.get("DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/dpp_hang"),
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/11"),
        "PYTHONUNBUFFERED": "1",
        "DPP_BROKER_QUEUE_IDLE_SEC": str(args.idle),
    }
    os.environ.update({k: env[k] for k in ("SQS_ENDPOINT_URL", "S3_ENDPOINT_URL", "SQS_QUEUE_NAME", "AWS_REGION",
                                           "DATABASE_URL", "REDIS_URL")})
    log = logs / "sweeper.log"
    worker = devstack.start_process(
        [BIN / "celery", "-A", "dpp", "worker", "-l", "INFO", "-c", "1", "-n", f"hang-{queue}@%h",
         "-Q", f"{queue}-sweeps", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        env=env, log_path=log,
    )
    say(f"moto {moto.url} (pid {moto.proc.pid}), worker pid {worker.pid}, logs {logs}")
    try:
        deadline = time.monotonic() + 60
        while "ready." not in log.read_text(errors="replace"):
            if worker.poll() is not None or time.monotonic() > deadline:
                say("worker did not become ready")
                return 2
            time.sleep(0.2)
        time.sleep(2)  # a few polls in flight
        for i in range(args.restarts):
            moto.kill()
            time.sleep(args.down)
            moto.start()
            make_queues()
            say(f"moto restarted ({i + 1}/{args.restarts})")
            time.sleep(args.gap)
        time.sleep(args.settle)

        from dpp.celery import app

        task_id = app.send_task("dpp.record_queue_depth", queue=f"{queue}-sweeps").id
        say(f"published dpp.record_queue_depth[{task_id}]")
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            if received(log, task_id):
                say(f"RECEIVED after {args.wait - (deadline - time.monotonic()):.1f} s: the worker consumes")
                return 0
            if worker.poll() is not None:
                say(f"worker exited with {worker.returncode}")
                return 1
            time.sleep(0.2)
        say(f"NOT received within {args.wait:.0f} s: the worker is alive ({worker.poll() is None}) and silent")
        return 1
    finally:
        devstack.stop_process(worker)
        if moto.proc.poll() is None:
            devstack.stop_process(moto.proc)


if __name__ == "__main__":
    sys.exit(main())
