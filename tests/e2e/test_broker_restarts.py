"""A worker keeps consuming across SQS restarts back to back (the chaos runner's silent sweeper).

A real `celery -A dpp worker` with the chaos runner's flags consumes the sweeps
queue of a private moto_server (free port, started and SIGKILLed here by PID,
never the shared one). Each restart costs the worker its connection: Celery
resets the hub and reconnects. Before the fix in dpp/adapters/kombu_sqs.py
(`Transport.register_with_event_loop`) the reconnected worker logged
"Connected", then "Error in timer: cannot invoke info_read() - no multi
handle", and never polled again while its process stayed alive.

`DPP_BROKER_QUEUE_IDLE_SEC=3` makes the worker tag its mailbox queue every
second, a synchronous SQS call that meets the outage as an ack or a sweep's
own SQS call does in production: the connection loss is certain, not a race.
"""
from __future__ import annotations

import os
import time
import uuid

from celery import Celery

from tests.e2e.conftest import BIN, ROOT, devstack
from tests.support.services import REGION, PrivateMoto
from tests.support.wait import wait_for

RESTARTS = 3
DOWN_SEC = 2.0          # longer than the worker's 1 s between mailbox touches
RECEIVE_TIMEOUT_SEC = 25  # reconnect backoff 2 s + 4 s, moto's start, one long poll


def _producer(moto: PrivateMoto, queue: str, url: str) -> Celery:
    app = Celery("producer", broker=f"sqs://testing:testing@127.0.0.1:{moto.port}", set_as_current=False)
    app.conf.broker_transport_options = {
        "region": REGION, "is_secure": False,
        "predefined_queues": {queue: {"url": url, "access_key_id": "testing", "secret_access_key": "testing"}},
    }
    return app


def _publish(moto: PrivateMoto, queue: str, url: str) -> str:
    """One sweep task on the sweeps queue, from a fresh connection (the old one died with moto)."""
    app = _producer(moto, queue, url)
    try:
        return app.send_task("dpp.record_queue_depth", queue=queue).id
    finally:
        app.close()


def test_the_sweeper_consumes_again_after_each_of_three_sqs_restarts(settings, tmp_path):
    name = f"dpp-restarts-{uuid.uuid4().hex[:6]}"
    sweeps = f"{name}-sweeps"
    moto = PrivateMoto(tmp_path).start()

    def make_queues() -> str:  # as the chaos runner's _recreate_aws: same names, so the same URLs
        devstack.ensure_queue(name, REGION, moto.url)
        return devstack.ensure_queue(sweeps, REGION, moto.url)

    sweeps_url = make_queues()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SQS_ENDPOINT_URL": moto.url,  # S3 stays on the shared moto
        "SQS_QUEUE_NAME": name,
        "SQS_QUEUE_URL": "",
        "DPP_BROKER_QUEUE_IDLE_SEC": "3",
    }
    log = tmp_path / "sweeper.log"
    worker = devstack.start_process(
        [BIN / "celery", "-A", "dpp", "worker", "-l", "INFO", "-c", "1", "-n", f"{name}@%h",
         "-Q", sweeps, "--without-gossip", "--without-mingle", "--without-heartbeat"],
        env=env, log_path=log,
    )

    def wait_received(task_id: str, what: str) -> None:
        def received() -> bool:
            assert worker.poll() is None, f"the worker exited ({worker.returncode}):\n{log.read_text()[-3000:]}"
            return f"[{task_id}] received" in log.read_text(errors="replace")

        try:
            wait_for(received, RECEIVE_TIMEOUT_SEC, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the worker is alive and silent:\n{log.read_text()[-3000:]}") from None

    try:
        wait_for(lambda: "ready." in log.read_text(errors="replace") or worker.poll() is not None, 30, "the worker")
        task_id = _publish(moto, sweeps, sweeps_url)
        wait_received(task_id, "the first task")

        for restart in range(1, RESTARTS + 1):
            moto.kill()
            time.sleep(DOWN_SEC)
            moto.start()
            assert make_queues() == sweeps_url
            task_id = _publish(moto, sweeps, sweeps_url)
            started = time.monotonic()
            wait_received(task_id, f"the worker to receive a task after SQS restart {restart}/{RESTARTS}")
            print(f"\nrestart {restart}: received {time.monotonic() - started:.1f} s after publishing")

        text = log.read_text(errors="replace")
        assert text.count("Connection to broker lost") >= RESTARTS, "a restart the worker never noticed"
        assert "no multi handle" not in text
    finally:
        devstack.stop_process(worker)
        moto.stop()
