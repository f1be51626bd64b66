"""One paid run end to end: HTTP -> Redis + ledger -> SQS -> celery worker -> S3 -> settlement."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.conftest import assert_invariants
from tests.support.inputs import DECISION
from tests.support.inputs import DECISION_COST_MICROS as COST_MICROS



def wait_terminal(url: str, headers: dict, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = requests.get(url, headers=headers, timeout=5).json()
        if body["status"] in ("COMPLETED", "FAILED"):
            return body
        time.sleep(0.2)
    raise AssertionError(f"run did not finish in {timeout}s: {body}")


def test_a_paid_run_completes_and_settles_exactly(platform, tenant, clean):
    tenant_id, key = tenant
    base, auth = platform["url"], {"Authorization": f"Bearer {key}"}
    submit = dict(json={"pack_type": "decision", "inputs": DECISION, "max_cost_usd": "0.50"},
                  headers={**auth, "Idempotency-Key": "e2e-1"}, timeout=10)

    created = requests.post(f"{base}/v1/runs", **submit)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["status"] == "QUEUED" and body["reserved_cost_usd"] == "0.50"
    assert created.headers["Location"].endswith(f"/v1/runs/{body['run_id']}")

    done = wait_terminal(f"{base}/v1/runs/{body['run_id']}", auth)
    assert done["status"] == "COMPLETED", done
    assert done["actual_cost_usd"] == "0.0058" and done["result_url"]

    balance = requests.get(f"{base}/v1/balance", headers=auth, timeout=5).json()
    assert balance == {"tenant_id": tenant_id, "available_usd": "9.9942", "held_usd": "0.00", "spent_usd": "0.0058"}

    # The stored result, through its presigned URL and in S3 with the cost receipt.
    envelope = requests.get(done["result_url"], timeout=5).json()
    assert envelope["result"]["recommendation"] == "Postgres"
    from dpp.adapters.results import result_key

    assert clean.results.head(result_key(tenant_id, body["run_id"])).actual_cost_micros == COST_MICROS

    # Replaying the key: the same response, no second reservation.
    replay = requests.post(f"{base}/v1/runs", **submit)
    assert replay.status_code == 201 and replay.json() == body
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert requests.get(f"{base}/v1/balance", headers=auth, timeout=5).json() == balance

    # The admin CLI reads the same books.
    shown = subprocess.run(
        [str(Path(sys.executable).parent / "dpp"), "budget", "show", "--tenant", tenant_id],
        capture_output=True, text=True, check=True, env=platform["env"],
    ).stdout
    assert "available  9.9942" in shown and "redis      9.9942" in shown

    assert_invariants(clean)


def test_a_failing_pack_ends_failed_at_the_minimum_fee(platform, tenant, clean):
    tenant_id, key = tenant
    base, auth = platform["url"], {"Authorization": f"Bearer {key}"}
    created = requests.post(
        f"{base}/v1/runs", json={"pack_type": "boom", "inputs": {}, "max_cost_usd": "0.10"},
        headers={**auth, "Idempotency-Key": "e2e-boom"}, timeout=10,
    )
    assert created.status_code == 201, created.text
    done = wait_terminal(f"{base}/v1/runs/{created.json()['run_id']}", auth)
    assert done["status"] == "FAILED" and done["error"]["code"] == "PACK_ERROR"
    assert done["actual_cost_usd"] == done["minimum_fee_usd"] == "0.005"
    assert_invariants(clean)


def test_bad_requests_get_problem_json_and_reserve_nothing(platform, tenant, clean):
    tenant_id, key = tenant
    base, auth = platform["url"], {"Authorization": f"Bearer {key}"}
    cases = [
        ({}, {"pack_type": "decision", "inputs": DECISION, "max_cost_usd": "0.50"}, 401),
        (auth, {"pack_type": "decision", "inputs": DECISION, "max_cost_usd": "0.50"}, 400),
        ({**auth, "Idempotency-Key": "x1"}, {"pack_type": "decision", "inputs": DECISION, "max_cost_usd": 0.5}, 422),
        ({**auth, "Idempotency-Key": "x2"}, {"pack_type": "decision", "inputs": DECISION, "max_cost_usd": "1e3"}, 422),
        ({**auth, "Idempotency-Key": "x3"}, {"pack_type": "decision", "inputs": {}, "max_cost_usd": "0.50"}, 422),
        ({**auth, "Idempotency-Key": "x4"}, {"pack_type": "decision", "inputs": DECISION, "max_cost_usd": "5000.00"}, 422),
        ({**auth, "Idempotency-Key": "x5"}, {"pack_type": "nope", "inputs": {}, "max_cost_usd": "0.50"}, 422),
    ]
    for headers, body, status in cases:
        r = requests.post(f"{base}/v1/runs", json=body, headers=headers, timeout=10)
        assert r.status_code == status, (body, r.text)
        assert r.headers["Content-Type"].startswith("application/problem+json")
        problem = r.json()
        assert {"type", "title", "status", "detail", "instance", "trace_id"} <= problem.keys()
    other = requests.get(f"{base}/v1/runs/00000000-0000-0000-0000-000000000000", headers=auth, timeout=5)
    assert other.status_code == 404
    balance = requests.get(f"{base}/v1/balance", headers=auth, timeout=5).json()
    assert balance["held_usd"] == "0.00" and balance["available_usd"] == "10.00"
    assert_invariants(clean)
