"""Workers that die at the worst moment, with real processes and real SIGKILL (SPEC §3).

These tests run their own API and workers on a queue of their own, with short
leases (3 s), a 1 s heartbeat, a 5 s SQS visibility timeout and a 3 s
reconcile threshold. The test process plays beat: it runs every sweep once a
second, so the bound of SPEC §2 invariant 4 is lease + threshold + 1 s.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
import requests
from celery import Celery
from sqlalchemy import text

from dpp.bootstrap import Deps
from dpp.services import sweeps
from tests.conftest import assert_invariants, make_tenant
from tests.e2e.conftest import BIN, ROOT, devstack
from tests.support.wait import wait_for
from tests.support.inputs import DECISION, DECISION_COST_MICROS

LEASE_SEC, HEARTBEAT_SEC, VISIBILITY_SEC, THRESHOLD_SEC = 3, 1, 5, 3
BOUND_SEC = LEASE_SEC + THRESHOLD_SEC + 1
MIN_FEE = 5_000


@pytest.fixture(scope="module")
def stack(settings, tmp_path_factory):
    """An API on a queue of its own; workers are started per test."""
    logs = tmp_path_factory.mktemp("resilience")
    sqs = boto3.client("sqs", region_name=settings.aws_region, endpoint_url=settings.sqs_endpoint_url,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    name = f"dpp-resilience-{uuid.uuid4().hex[:6]}"
    dlq_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue_url = sqs.create_queue(QueueName=name, Attributes={
        "VisibilityTimeout": str(VISIBILITY_SEC),
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "3"}),
    })["QueueUrl"]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DPP_EXTRA_PACKS": "tests.support.packs:BoomPack,tests.support.packs:SlowPack",
        "SQS_QUEUE_NAME": name,
        "SQS_QUEUE_URL": queue_url,
        "WORKER_LEASE_TTL_SEC": str(LEASE_SEC),
        "WORKER_HEARTBEAT_INTERVAL_SEC": str(HEARTBEAT_SEC),
        "WORKER_VISIBILITY_TIMEOUT_SEC": str(VISIBILITY_SEC),
        "RECONCILE_THRESHOLD_MIN": str(THRESHOLD_SEC / 60),
    }
    port = devstack.free_port()
    api = devstack.start_process(
        [str(BIN / "gunicorn"), "-b", f"127.0.0.1:{port}", "-w", "1", "dpp.api:create_app()"],
        env=env, log_path=logs / "api.log",
    )
    try:
        devstack.wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
        yield {"url": f"http://127.0.0.1:{port}", "env": env, "logs": logs, "queue_url": queue_url,
               "dlq_url": dlq_url, "sqs": sqs}
    finally:
        devstack.stop_process(api)
        sqs.delete_queue(QueueUrl=queue_url)
        sqs.delete_queue(QueueUrl=dlq_url)


@pytest.fixture
def deps_fast(clean, stack):
    """The test's own services with the stack's thresholds, to run the sweeps."""
    s = dataclasses.replace(clean.settings, reconcile_threshold_min=THRESHOLD_SEC / 60,
                            worker_lease_ttl_sec=LEASE_SEC, sqs_queue_url=stack["queue_url"])
    d = Deps(s)
    d.packs = clean.packs
    return d


class Workers:
    def __init__(self, stack):
        self.stack, self.procs = stack, []

    def start(self, name: str, faults: str = "") -> dict:
        log = self.stack["logs"] / f"{name}-{uuid.uuid4().hex[:4]}.log"
        env = {**self.stack["env"], "DPP_FAULTS": faults}
        proc = devstack.start_process(
            [str(BIN / "celery"), "-A", "dpp", "worker", "-l", "INFO", "-c", "1", "-n", f"{name}-{uuid.uuid4().hex[:4]}@%h",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            env=env, log_path=log,
        )
        deadline = time.monotonic() + 30
        while "ready." not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        worker = {"proc": proc, "log": log}
        self.procs.append(worker)
        return worker

    def stop_all(self):
        for w in self.procs:
            devstack.stop_process(w["proc"])


@pytest.fixture
def workers(stack):
    w = Workers(stack)
    yield w
    w.stop_all()


def submit(stack, key, body):
    r = requests.post(f"{stack['url']}/v1/runs", json=body,
                      headers={"Authorization": f"Bearer {key}", "Idempotency-Key": uuid.uuid4().hex}, timeout=20)
    assert r.status_code == 201, r.text
    return r.json()["run_id"]


def run_row(deps, run_id):
    with deps.db.transaction() as s:
        return s.execute(text("SELECT * FROM runs WHERE id = :id"), {"id": run_id}).mappings().one()


def sweep_until_terminal(deps, run_id, timeout):
    """Play beat: every sweep once a second until the run ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for sweep in (sweeps.sweep_expired_leases, sweeps.reconcile_stuck, sweeps.sweep_stale_queued):
            sweep(deps)
        row = run_row(deps, run_id)
        if row["status"] in ("COMPLETED", "FAILED"):
            return row
        time.sleep(1)
    raise AssertionError(f"run {run_id} not terminal after {timeout}s: {dict(run_row(deps, run_id))}")


def spent(deps, tenant_id):
    with deps.db.transaction() as s:
        return s.execute(text("SELECT spent_micros FROM tenant_balances WHERE tenant_id = :t"), {"t": tenant_id}).scalar()


SLOW = {"pack_type": "slow", "inputs": {"seconds": 4}, "max_cost_usd": "0.10"}
QUICK = {"pack_type": "decision", "inputs": DECISION, "max_cost_usd": "0.50"}


def queue_counts(stack) -> tuple[int, int]:
    """(visible, in flight) messages on the stack's queue, as SQS itself counts them."""
    attrs = stack["sqs"].get_queue_attributes(
        QueueUrl=stack["queue_url"],
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


def test_a_run_three_times_longer_than_its_lease_completes_charged_once(stack, deps_fast, workers):
    tenant_id, key = make_tenant(deps_fast)
    workers.start("long")
    run_id = submit(stack, key, {**SLOW, "inputs": {"seconds": 3.5 * LEASE_SEC}})
    wait_for(lambda: run_row(deps_fast, run_id)["status"] != "QUEUED", 20, "a worker to take the message")
    received = time.monotonic()

    # Past the queue's visibility timeout only the heartbeat keeps the message in
    # flight; without it SQS would show it visible again, for another worker to take.
    late = []
    while (row := run_row(deps_fast, run_id))["status"] not in ("COMPLETED", "FAILED"):
        assert time.monotonic() - received < 40, "the run did not finish"
        if time.monotonic() - received > VISIBILITY_SEC + 1:
            late.append(queue_counts(stack))
        time.sleep(0.25)
    assert len(late) >= 3 and set(late) == {(0, 1)}, late

    assert row["status"] == "COMPLETED" and row["actual_cost_micros"] == 2_000
    assert spent(deps_fast, tenant_id) == 2_000
    # Acknowledged after COMMIT: the message is gone, not waiting to come back.
    wait_for(lambda: queue_counts(stack) == (0, 0), 10, "the message to be deleted")
    assert_invariants(deps_fast, [tenant_id])


def test_a_worker_killed_mid_pack_ends_failed_at_the_minimum_fee_within_the_bound(stack, deps_fast, workers):
    tenant_id, key = make_tenant(deps_fast)
    worker = workers.start("victim")
    run_id = submit(stack, key, SLOW)
    wait_for(lambda: run_row(deps_fast, run_id)["progress"] > 0, 20, "the pack to start")
    os.killpg(worker["proc"].pid, signal.SIGKILL)  # the whole worker, main process and pool
    killed_at = time.monotonic()

    row = sweep_until_terminal(deps_fast, run_id, timeout=BOUND_SEC + 10)
    assert time.monotonic() - killed_at <= BOUND_SEC + 2
    assert (row["status"], row["error_code"], row["actual_cost_micros"]) == ("FAILED", "LEASE_EXPIRED", MIN_FEE)

    # The message comes back after its visibility timeout; a new worker drops it.
    survivor = workers.start("survivor")
    wait_for(lambda: "duplicate:terminal" in survivor["log"].read_text(), 20, "the redelivered message to be dropped")
    assert spent(deps_fast, tenant_id) == MIN_FEE
    assert_invariants(deps_fast, [tenant_id])


@pytest.mark.parametrize(
    "fault, status, error_code, charge",
    [
        ("mid_pack", "FAILED", "LEASE_EXPIRED", MIN_FEE),
        ("after_finalize_claim", "FAILED", "ROLLED_BACK", MIN_FEE),
        ("after_s3_upload", "COMPLETED", None, DECISION_COST_MICROS),
        ("after_redis_settle", "COMPLETED", None, DECISION_COST_MICROS),
    ],
)
def test_a_pool_process_killed_at_a_fault_point_settles_exactly_once(
    stack, deps_fast, workers, fault, status, error_code, charge
):
    tenant_id, key = make_tenant(deps_fast)
    worker = workers.start("faulty", faults=fault)
    run_id = submit(stack, key, QUICK if fault != "mid_pack" else {**QUICK, "pack_type": "slow", "inputs": {"seconds": 1}})
    wait_for(lambda: "WorkerLostError" in worker["log"].read_text() or "SIGKILL" in worker["log"].read_text(),
             20, f"the pool process to die at {fault}")
    started = time.monotonic()

    row = sweep_until_terminal(deps_fast, run_id, timeout=BOUND_SEC + 10)
    assert time.monotonic() - started <= BOUND_SEC + 2
    assert (row["status"], row["error_code"]) == (status, error_code)
    assert row["actual_cost_micros"] == charge
    assert spent(deps_fast, tenant_id) == charge
    if status == "COMPLETED":
        meta = deps_fast.results.head(row["result_key"])
        assert meta.actual_cost_micros == charge
    assert_invariants(deps_fast, [tenant_id])


def test_one_message_delivered_to_two_workers_at_once_runs_once(stack, deps_fast, workers):
    tenant_id, key = make_tenant(deps_fast)
    first, second = workers.start("twin-a"), workers.start("twin-b")
    run_id = submit(stack, key, {**SLOW, "inputs": {"seconds": 2}})
    # A second copy of the same message, as SQS's at-least-once delivery may make.
    producer(stack).send_task("dpp.execute_run", args=[run_id])

    logs = lambda: first["log"].read_text() + second["log"].read_text()  # noqa: E731
    wait_for(lambda: "duplicate:" in logs(), 30, "the second copy to be dropped")
    row = wait_for(lambda: (r := run_row(deps_fast, run_id))["status"] == "COMPLETED" and r, 30, "completion")
    assert row["actual_cost_micros"] == 2_000 and spent(deps_fast, tenant_id) == 2_000
    with deps_fast.db.transaction() as s:
        charges = s.execute(text("SELECT count(*) FROM ledger_transfers WHERE run_id = :id AND kind = 'CHARGE'"),
                            {"id": run_id}).scalar()
    assert charges == 1
    assert_invariants(deps_fast, [tenant_id])


def producer(stack) -> Celery:
    """A Celery producer of our own on the stack's queue, for messages the API would not send."""
    from urllib.parse import urlsplit

    parts = urlsplit(stack["env"]["SQS_ENDPOINT_URL"])
    app = Celery("producer", broker=f"sqs://testing:testing@{parts.hostname}:{parts.port}", set_as_current=False)
    app.conf.broker_transport_options = {
        "region": "us-east-1", "is_secure": False,
        "predefined_queues": {stack["env"]["SQS_QUEUE_NAME"]: {
            "url": stack["queue_url"], "access_key_id": "testing", "secret_access_key": "testing"}},
    }
    app.conf.task_default_queue = stack["env"]["SQS_QUEUE_NAME"]
    return app


def test_a_message_no_worker_can_handle_is_dead_lettered_after_three_receives(stack, workers):
    workers.start("poison")
    producer(stack).send_task("dpp.no_such_task", args=["x"])
    sqs = stack["sqs"]
    wait_for(
        lambda: int(sqs.get_queue_attributes(QueueUrl=stack["dlq_url"], AttributeNames=["ApproximateNumberOfMessages"])
                    ["Attributes"]["ApproximateNumberOfMessages"]) == 1,
        5 * VISIBILITY_SEC + 20, "the poison message to reach the dead-letter queue",
    )


def test_two_beats_schedule_only_once(stack, tmp_path):
    """Two `celery beat` processes with redbeat: one holds the lock and schedules."""
    env = {**stack["env"], "REAPER_INTERVAL_SEC": "1", "RECONCILE_INTERVAL_SEC": "1",
           "DPP_REDBEAT_KEY_PREFIX": f"dpp:redbeat:test-{uuid.uuid4().hex[:6]}"}
    beats = []
    for i in range(2):
        log = tmp_path / f"beat{i}.log"
        beats.append((devstack.start_process([str(BIN / "celery"), "-A", "dpp", "beat", "-l", "DEBUG",
                                              "-s", str(tmp_path / f"schedule{i}")], env=env, log_path=log), log))
    try:
        time.sleep(8)
    finally:
        for proc, _ in beats:
            devstack.stop_process(proc)
    sent = [log.read_text().count("Sending due task") for _, log in beats]
    assert sorted(sent)[0] == 0 and sorted(sent)[1] >= 3, sent
    stack["sqs"].purge_queue(QueueUrl=stack["queue_url"])
