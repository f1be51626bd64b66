"""What operators see, on the processes `make run` starts (SPEC §6, issue #7).

API, worker, beat and Flower from `devstack.platform_commands` (the same
commands and flags as `make run`), JSON logs, on a queue of their own with
short leases and a 2 s reaper so a stalled worker's run is swept in seconds:
- Flower's API lists the worker and a completed `dpp.execute_run`;
- `celery -A dpp inspect ping` answers over SNS;
- one submission's trace id is in the API's, the worker's and the sweep's logs;
- the run and money counters move on the API's and the worker's /metrics.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid

import boto3
import pytest
import requests

from tests.conftest import assert_invariants, make_tenant
from tests.e2e.conftest import BIN, ROOT, devstack
from tests.support.wait import wait_for
from tests.support.inputs import DECISION, DECISION_COST_MICROS

LEASE_SEC, REAPER_SEC = 3, 2
MIN_FEE, SLOW_COST = 5_000, 2_000
BASIC_AUTH = ("ops", "e2e-secret")


@pytest.fixture(scope="module")
def ops(settings, tmp_path_factory):
    state = tmp_path_factory.mktemp("ops")
    sqs = boto3.client("sqs", region_name=settings.aws_region, endpoint_url=settings.sqs_endpoint_url,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    name = f"dpp-ops-{uuid.uuid4().hex[:6]}"
    queue_url = devstack.ensure_queue(name, settings.aws_region, settings.sqs_endpoint_url)
    roles = ("api", "flower", "worker", "peer", "beat")
    ports = dict(zip(roles, devstack.free_ports(len(roles))))
    worker_name = f"ops-{ports['worker']}@%h"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DPP_JSON_LOGS": "1",
        "DPP_EXTRA_PACKS": "tests.support.packs:SlowPack",
        "SQS_QUEUE_NAME": name,
        "SQS_QUEUE_URL": queue_url,
        "WORKER_LEASE_TTL_SEC": str(LEASE_SEC),
        "WORKER_HEARTBEAT_INTERVAL_SEC": "1",
        "WORKER_VISIBILITY_TIMEOUT_SEC": "10",
        "REAPER_INTERVAL_SEC": str(REAPER_SEC),
        "DPP_REDBEAT_KEY_PREFIX": f"dpp:redbeat:{name}",
    }
    commands = devstack.platform_commands(ports["api"], ports["flower"], ":".join(BASIC_AUTH),
                                          {"worker": ports["worker"], "beat": ports["beat"]}, state_dir=state)
    procs = {}
    try:
        for role, argv, extra in commands:
            if role == "worker":
                # A second worker runs the sweeps while the test stalls the first one.
                peer = [a if not a.startswith("worker1@") else f"peer-{worker_name}" for a in argv]
                peer_extra = {**extra, "DPP_METRICS_PORT": str(ports["peer"]),
                              "PROMETHEUS_MULTIPROC_DIR": str(state / "prometheus" / "peer")}
                (state / "prometheus" / "peer").mkdir(parents=True)
                procs["peer"] = devstack.start_process(peer, env={**env, **peer_extra}, log_path=state / "peer.log")
                argv = [a if not a.startswith("worker1@") else worker_name for a in argv]
            procs[role] = devstack.start_process(argv, env={**env, **extra}, log_path=state / f"{role}.log")
        api = f"http://127.0.0.1:{ports['api']}"
        devstack.wait_http(f"{api}/health", timeout=30)
        for role in ("worker", "peer", "beat"):
            devstack.wait_http(f"http://127.0.0.1:{ports[role]}/healthz", timeout=60, status=200)
        devstack.wait_http(f"http://127.0.0.1:{ports['flower']}/healthcheck", timeout=60)
        # Events are fire-and-forget: Flower sees only tasks that run after its event
        # queue is subscribed to the events topic, which its capture thread does a
        # moment after it answers HTTP.
        sns = boto3.client("sns", region_name=settings.aws_region, endpoint_url=settings.sqs_endpoint_url,
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        topic = sns.create_topic(Name=f"{name}-events")["TopicArn"]
        wait_for(lambda: any(f"{name}-ev-" in sub["Endpoint"] for sub in
                             sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]),
                 60, "Flower's event subscription")
        yield {"api": api, "flower": f"http://127.0.0.1:{ports['flower']}", "ports": ports, "env": env,
               "logs": state, "procs": procs, "workers": {
                   "worker": worker_name.replace("%h", os.uname().nodename),
                   "peer": f"peer-{worker_name}".replace("%h", os.uname().nodename)}}
    finally:
        devstack.stop_processes([procs[r] for r in ("flower", "beat", "worker", "peer", "api") if r in procs])
        for queue in (name, f"{name}-dlq"):
            sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=queue)["QueueUrl"])


def submit(ops, key: str, body: dict, trace_id: str) -> str:
    response = requests.post(f"{ops['api']}/v1/runs", json=body, timeout=10, headers={
        "Authorization": f"Bearer {key}", "Idempotency-Key": uuid.uuid4().hex,
        "traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01",
    })
    assert response.status_code == 201, response.text
    # The API continues the agent's trace and says so.
    assert response.headers["X-Trace-Id"] == trace_id
    return response.json()["run_id"]


def run_status(ops, key: str, run_id: str) -> dict:
    return requests.get(f"{ops['api']}/v1/runs/{run_id}", headers={"Authorization": f"Bearer {key}"},
                        timeout=5).json()


def log_lines(ops, role: str) -> list[dict]:
    lines = (ops["logs"] / f"{role}.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def scrape(url: str) -> dict[str, float]:
    samples = {}
    for line in requests.get(url, timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_operators_see_runs_workers_traces_and_money(ops, seeded):
    # `seeded`, not `clean`: its FLUSHDB would take beat's redbeat lock and schedule
    # away mid-test (beat steps down and re-seeds: tests/e2e/test_beat_resilience.py).
    tenant_id, key = make_tenant(seeded)
    flower = requests.Session()
    flower.auth = BASIC_AUTH
    assert requests.get(f"{ops['flower']}/api/workers", timeout=10).status_code == 401  # behind basic auth

    # A run that completes: Flower shows the worker and the task.
    done_trace = uuid.uuid4().hex
    done_id = submit(ops, key, {"pack_type": "decision", "inputs": DECISION, "max_cost_usd": "0.50"}, done_trace)
    wait_for(lambda: run_status(ops, key, done_id)["status"] == "COMPLETED", 60, "the decision run")
    names = set(ops["workers"].values())
    workers = wait_for(lambda: names <= set(w := flower.get(f"{ops['flower']}/api/workers?refresh=1",
                                                            timeout=30).json()) and w, 60, "Flower's worker list")
    assert all(workers[n]["stats"]["pool"]["max-concurrency"] == 1 for n in names)  # answered over SNS
    task = wait_for(lambda: flower.get(f"{ops['flower']}/api/tasks?taskname=dpp.execute_run",
                                       timeout=10).json().get(done_id), 60, "the task in Flower")
    assert task["state"] == "SUCCESS" and task["worker"] in names
    assert task["result"] == f"'completed:{DECISION_COST_MICROS}'"

    # Remote control over SNS, from the CLI an engineer uses.
    ping = subprocess.run([str(BIN / "celery"), "-A", "dpp", "inspect", "ping", "-t", "10"],
                          env=ops["env"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "pong" in ping.stdout and "2 nodes online" in ping.stdout

    def traced(role: str, msg: str, trace_id: str) -> list[dict]:
        return [line for line in log_lines(ops, role) if line["msg"] == msg and line.get("trace_id") == trace_id]

    # A run whose worker stalls: the sweep (on the other worker) ends it, in the run's own trace.
    stalled_trace = uuid.uuid4().hex
    stalled_id = submit(ops, key, {"pack_type": "slow", "inputs": {"seconds": 30}, "max_cost_usd": "0.05"},
                        stalled_trace)
    wait_for(lambda: run_status(ops, key, stalled_id)["status"] == "PROCESSING", 30, "the slow run to start")
    runner = wait_for(lambda: next((role for role in ("worker", "peer")
                                    if traced(role, "run started", stalled_trace)), None), 10, "its worker's log")
    sweeper = "peer" if runner == "worker" else "worker"
    pool = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(ops["procs"][runner].pid)],
                                               capture_output=True, text=True).stdout.split()]
    assert len(pool) == 1, pool
    os.kill(pool[0], signal.SIGSTOP)  # the pack and its heartbeat freeze; the lease runs out
    try:
        failed = wait_for(lambda: (r := run_status(ops, key, stalled_id))["status"] == "FAILED" and r,
                          LEASE_SEC + 3 * REAPER_SEC + 20, "the lease sweep")
    finally:
        os.kill(pool[0], signal.SIGCONT)
    assert failed["error"]["code"] == "LEASE_EXPIRED" and failed["actual_cost_usd"] == "0.005"

    submitted = traced("api", "run submitted", stalled_trace)
    assert submitted and submitted[0]["run_id"] == stalled_id and submitted[0]["tenant_id"] == tenant_id
    started = traced(runner, "run started", stalled_trace)
    assert started and started[0]["run_id"] == stalled_id and started[0]["tenant_id"] == tenant_id
    swept = traced(sweeper, "lease expired: run failed by the sweep", stalled_trace)
    assert swept and swept[0]["run_id"] == stalled_id
    assert traced("worker", "run settled", done_trace) or traced("peer", "run settled", done_trace)

    # The counters moved (each role's metrics directory started empty).
    api = scrape(f"{ops['api']}/metrics")
    assert api['dpp_runs_submitted_total{pack_type="decision"}'] == 1
    assert api['dpp_runs_submitted_total{pack_type="slow"}'] == 1
    assert api["dpp_money_reserved_usd_micros_total"] == 500_000 + 50_000
    assert api['dpp_http_requests_total{method="POST",route="/v1/runs",status="201"}'] == 2
    def workers_metrics() -> dict[str, float]:
        both = [scrape(f"http://127.0.0.1:{ops['ports'][role]}/metrics") for role in ("worker", "peer")]
        summed = {k: both[0].get(k, 0) + both[1].get(k, 0) for k in set(both[0]) | set(both[1])}
        summed["dpp_worker_heartbeat_timestamp_seconds"] = min(m["dpp_worker_heartbeat_timestamp_seconds"]
                                                               for m in both)
        return summed

    worker = wait_for(lambda: (m := workers_metrics()).get("dpp_lease_expiries_total") == 1 and m, 10,
                      "the workers' metrics")
    assert worker['dpp_runs_finished_total{error_code="",status="COMPLETED"}'] == 1
    assert worker['dpp_runs_finished_total{error_code="LEASE_EXPIRED",status="FAILED"}'] == 1
    assert worker["dpp_money_charged_usd_micros_total"] == DECISION_COST_MICROS + MIN_FEE
    assert worker["dpp_money_released_usd_micros_total"] == (500_000 - DECISION_COST_MICROS) + (50_000 - MIN_FEE)
    assert time.time() - worker["dpp_worker_heartbeat_timestamp_seconds"] < 30
    beat = requests.get(f"http://127.0.0.1:{ops['ports']['beat']}/healthz", timeout=5)
    assert beat.status_code == 200 and beat.json()["role"] == "scheduling"
    assert_invariants(seeded, [tenant_id])


def test_a_dead_flowers_queue_and_subscription_are_swept(ops):
    """`dpp.sweep_broker` (beat, every 5 min) removes what a killed Flower left behind."""
    env = {**ops["env"], "DPP_BROKER_QUEUE_IDLE_SEC": "1"}
    port = devstack.free_port()
    flower = devstack.start_process([str(BIN / "celery"), "-A", "dpp", "flower", "--address=127.0.0.1",
                                     f"--port={port}"], env=env, log_path=ops["logs"] / "flower2.log")
    try:
        devstack.wait_http(f"http://127.0.0.1:{port}/healthcheck", timeout=60)
        queue = wait_for(lambda: re.search(r"for SQS queue '[^']*:([^':]*-ev-[0-9a-f-]+)'",
                                           (ops["logs"] / "flower2.log").read_text()), 30, "Flower's event queue")
    finally:
        os.kill(flower.pid, signal.SIGKILL)  # no clean shutdown
        devstack.stop_process(flower)
    time.sleep(2)
    sweep = subprocess.run([str(BIN / "celery"), "-A", "dpp", "call", "dpp.sweep_broker"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert sweep.returncode == 0, sweep.stderr
    report = wait_for(lambda: next((line for line in log_lines(ops, "worker") + log_lines(ops, "peer")
                                    if line["msg"].startswith("Task dpp.sweep_broker")
                                    and queue.group(1) in line["msg"]), None), 30, "the broker sweep")
    assert "'stale_subscriptions_removed': 1" in report["msg"]
