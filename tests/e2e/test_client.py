"""dpp.client and `dpp submit|wait` against real gunicorn + celery worker over SQS."""
from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal

import pytest

from dpp.client import DppClient, IdempotencyConflict, InsufficientBudget, NotFound
from tests.conftest import assert_invariants
from tests.support.inputs import DECISION, DECISION_COST_MICROS

COST = Decimal(DECISION_COST_MICROS) / 1_000_000
START = Decimal("10.00")  # the `tenant` fixture's top-up
# The CLI exactly as the lead will wire it; registering here too must be harmless.
CLI = [sys.executable, "-c", "from dpp.cli import main; from dpp import client_cli; client_cli.register(main); main()"]


def dpp_cli(platform, key: str, *args: str) -> subprocess.CompletedProcess:
    env = {**platform["env"], "DPP_API_URL": platform["url"], "DPP_API_KEY": key}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120)


def test_an_agent_pays_for_a_run_with_the_client(platform, tenant, clean):
    tenant_id, key = tenant
    dpp = DppClient(platform["url"], key)

    created = dpp.submit("decision", DECISION, "0.50", idempotency_key="agent-task-1")
    assert created.status == "QUEUED" and created.reserved_cost_usd == Decimal("0.50") and not created.replayed

    run = dpp.wait(created.run_id, timeout=60)
    assert run.status == "COMPLETED", run.raw
    assert run.actual_cost_usd == COST and isinstance(run.actual_cost_usd, Decimal) and run.result_url

    balance = dpp.balance()
    assert balance.tenant_id == tenant_id
    assert (balance.available_usd, balance.held_usd, balance.spent_usd) == (START - COST, 0, COST)

    envelope = dpp.result(run.run_id)
    assert envelope["run_id"] == run.run_id and envelope["result"]["recommendation"] == "Postgres"
    assert Decimal(envelope["actual_cost_usd"]) == COST

    # The same key again: the same run, nothing reserved a second time.
    replay = dpp.submit("decision", DECISION, Decimal("0.50"), idempotency_key="agent-task-1")
    assert replay.replayed and replay.run_id == created.run_id
    assert dpp.balance() == balance
    with pytest.raises(IdempotencyConflict):
        dpp.submit("decision", DECISION, "0.60", idempotency_key="agent-task-1")

    # Within the pro plan's 50.00 per run but above the 9.9942 available: 402, nothing held.
    with pytest.raises(InsufficientBudget) as refused:
        dpp.submit("decision", DECISION, "20.00")
    assert refused.value.available_usd == START - COST and refused.value.requested_usd == Decimal("20.00")
    assert refused.value.trace_id

    with pytest.raises(NotFound):
        dpp.get("00000000-0000-0000-0000-000000000000")

    assert [r.run_id for r in dpp.list_runs(limit=1)] == [run.run_id]
    statement = list(dpp.ledger(limit=1))
    assert statement == list(dpp.ledger(limit=100)) and len(statement) >= 3
    assert all(isinstance(t.amount_usd, Decimal) for t in statement)
    assert dpp.balance() == balance

    assert_invariants(clean)


def test_the_cli_submits_waits_and_exits_by_outcome(platform, tenant, clean):
    tenant_id, key = tenant
    dpp = DppClient(platform["url"], key)

    done = dpp_cli(platform, key, "submit", "--pack", "decision", "--inputs", json.dumps(DECISION),
                   "--max-cost", "0.50", "--wait")
    assert done.returncode == 0, done.stderr
    completed = json.loads(done.stdout)
    assert completed["status"] == "COMPLETED" and Decimal(completed["actual_cost_usd"]) == COST

    # A pack that raises: FAILED at the minimum fee, and `dpp wait` exits 1.
    boom = dpp.submit("boom", {}, "0.10")
    waited = dpp_cli(platform, key, "wait", boom.run_id, "--timeout", "60")
    assert waited.returncode == 1, waited.stderr
    failed = json.loads(waited.stdout)
    assert failed["status"] == "FAILED" and failed["error"]["code"] == "PACK_ERROR"

    again = dpp_cli(platform, key, "wait", completed["run_id"])
    assert again.returncode == 0 and json.loads(again.stdout)["run_id"] == completed["run_id"]

    refused = dpp_cli(platform, key, "submit", "--pack", "decision", "--inputs", json.dumps(DECISION),
                      "--max-cost", "20.00")
    assert refused.returncode == 2 and refused.stdout == "" and "402" in refused.stderr

    missing = dpp_cli(platform, key, "wait", "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 2 and "404" in missing.stderr

    fee = Decimal(failed["actual_cost_usd"])
    assert fee == Decimal(failed["minimum_fee_usd"]) > 0
    assert dpp.balance().available_usd == START - COST - fee
    assert {r.status for r in dpp.list_runs()} == {"COMPLETED", "FAILED"}

    assert_invariants(clean)
