"""The money path through the services on real PostgreSQL, Redis, SQS and S3.

The worker side runs in-process here (execute.execute_run); tests/e2e runs it
in a real `celery worker`. Every test ends by checking SPEC §2 invariants 1-3.
"""
from __future__ import annotations

import json
import threading
import uuid

import pytest
from celery import Celery

from dpp.adapters.queue import CeleryQueue
from dpp.adapters.repository import RunRepository
from dpp.domain.errors import DependencyUnavailable, IdempotencyMismatch, InsufficientBudget, PlanViolation
from dpp.services import execute, ledger, tenants
from dpp.services.submit import Submission, submit_run
from tests.conftest import assert_invariants
from tests.support.inputs import DECISION
from tests.support.inputs import DECISION_COST_MICROS as DECISION_COST



def sub(inputs=None, pack_type="decision", max_cost=500_000):
    return Submission(pack_type, inputs if inputs is not None else DECISION, max_cost, "")


def principal(deps, key):
    return tenants.authenticate(deps, key)


def run_row(deps, run_id):
    with deps.db.transaction() as session:
        return RunRepository(session).get(run_id)


def books(deps, tenant_id):
    with deps.db.transaction() as session:
        return ledger.balances(session, tenant_id)


def test_a_paid_run_charges_its_actual_cost_and_releases_the_rest(clean, tenant):
    tenant_id, key = tenant
    done = submit_run(clean, principal(clean, key), "k1", sub(), "trace")
    run_id = str(done.run.id)
    assert books(clean, tenant_id).held == 500_000
    assert clean.budget.available(tenant_id) == 10_000_000 - 500_000

    assert execute.execute_run(clean, run_id) == f"completed:{DECISION_COST}"

    row = run_row(clean, run_id)
    assert (row.status, row.finalize_stage, row.money_state) == ("COMPLETED", "COMMITTED", "SETTLED")
    assert row.actual_cost_micros == DECISION_COST
    b = books(clean, tenant_id)
    assert (b.available, b.held, b.spent) == (10_000_000 - DECISION_COST, 0, DECISION_COST)
    stored = clean.results.head(row.result_key)
    assert stored.actual_cost_micros == DECISION_COST
    envelope = json.loads(clean.results.get(row.result_key))
    assert envelope["result"]["recommendation"] == "Postgres"
    assert_invariants(clean)


def test_a_second_delivery_of_a_finished_run_is_dropped_and_charges_nothing(clean, tenant):
    tenant_id, key = tenant
    run_id = str(submit_run(clean, principal(clean, key), "k1", sub(), "t").run.id)
    execute.execute_run(clean, run_id)
    assert execute.execute_run(clean, run_id) == "duplicate:terminal"
    assert books(clean, tenant_id).spent == DECISION_COST
    assert_invariants(clean)


def test_replaying_an_idempotency_key_returns_the_same_run_and_reserves_nothing(clean, tenant):
    tenant_id, key = tenant
    who = principal(clean, key)
    first = submit_run(clean, who, "same", sub(), "t")
    again = submit_run(clean, who, "same", sub(), "t")
    assert again.replayed and again.run.id == first.run.id
    assert books(clean, tenant_id).held == 500_000
    with pytest.raises(IdempotencyMismatch):
        submit_run(clean, who, "same", sub(max_cost=400_000), "t")
    execute.execute_run(clean, str(first.run.id))
    assert_invariants(clean)


def test_concurrent_identical_submissions_make_one_run_and_one_reservation(clean, tenant):
    tenant_id, key = tenant
    who = principal(clean, key)
    results, errors = [], []

    def go():
        try:
            results.append(submit_run(clean, who, "race", sub(), "t"))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r.run.id for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    assert books(clean, tenant_id).held == 500_000
    assert clean.budget.available(tenant_id) == 10_000_000 - 500_000
    execute.execute_run(clean, str(results[0].run.id))
    assert_invariants(clean)


def test_insufficient_budget_reserves_nothing(clean, tenant):
    tenant_id, key = tenant
    with pytest.raises(InsufficientBudget) as info:
        submit_run(clean, principal(clean, key), "big", sub(max_cost=20_000_000), "t")
    assert info.value.available_micros == 10_000_000
    assert books(clean, tenant_id).held == 0
    assert clean.budget.available(tenant_id) == 10_000_000
    assert_invariants(clean)


def test_a_cap_below_the_price_is_refused_before_reserving(clean, tenant):
    tenant_id, key = tenant
    with pytest.raises(PlanViolation):
        submit_run(clean, principal(clean, key), "cheap", sub(max_cost=100), "t")
    assert books(clean, tenant_id).held == 0
    assert_invariants(clean)


def test_a_failed_enqueue_gives_everything_back_and_frees_the_key(clean, tenant, settings, monkeypatch):
    """The queue is a real kombu SQS producer aimed at a port where nothing listens."""
    tenant_id, key = tenant
    dead = Celery("dead", broker="sqs://testing:testing@127.0.0.1:9", set_as_current=False)
    dead.conf.broker_transport_options = {
        "region": settings.aws_region, "is_secure": False,
        "predefined_queues": {"dpp-dead": {"url": "http://127.0.0.1:9/000000000000/dpp-dead",
                                           "access_key_id": "testing", "secret_access_key": "testing"}},
        "client-config": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 0}},
    }
    dead.conf.task_default_queue = "dpp-dead"
    dead.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0, "interval_step": 0.1}
    monkeypatch.setitem(clean.__dict__, "queue", CeleryQueue(dead))

    with pytest.raises(DependencyUnavailable):
        submit_run(clean, principal(clean, key), "q-down", sub(), "t")

    with clean.db.transaction() as session:
        from dpp.adapters import orm

        failed = session.query(orm.Run).filter_by(tenant_id=tenant_id).one()
        assert (failed.status, failed.error_code, failed.actual_cost_micros) == ("FAILED", "ENQUEUE_FAILED", 0)
        assert failed.idempotency_key is None
    b = books(clean, tenant_id)
    assert (b.available, b.held, b.spent) == (10_000_000, 0, 0)
    assert clean.budget.available(tenant_id) == 10_000_000
    assert_invariants(clean)

    monkeypatch.undo()
    retry = submit_run(clean, principal(clean, key), "q-down", sub(), "t")
    assert not retry.replayed
    execute.execute_run(clean, str(retry.run.id))
    assert_invariants(clean)


def test_a_database_failure_after_the_hold_answers_503_and_holds_nothing(clean, tenant, monkeypatch):
    """PostgreSQL fails inside the submission's transaction, after Redis holds the cap
    (a real statement timeout): the hold is given back and nothing is recorded."""
    from sqlalchemy import text

    from dpp.services import ledger

    tenant_id, key = tenant
    real_record = ledger.record_reservation

    def record_then_time_out(session, *args):
        real_record(session, *args)
        assert clean.budget.available(tenant_id) == 10_000_000 - 500_000  # held by now
        session.execute(text("SET LOCAL statement_timeout = '10ms'"))
        session.execute(text("SELECT pg_sleep(1)"))

    monkeypatch.setattr(ledger, "record_reservation", record_then_time_out)
    with pytest.raises(DependencyUnavailable):
        submit_run(clean, principal(clean, key), "db-fails", sub(), "t")

    with clean.db.transaction() as session:
        from dpp.adapters import orm

        assert session.query(orm.Run).filter_by(tenant_id=tenant_id).count() == 0
    b = books(clean, tenant_id)
    assert (b.available, b.held, b.spent) == (10_000_000, 0, 0)
    assert clean.budget.available(tenant_id) == 10_000_000
    assert_invariants(clean)

    monkeypatch.undo()
    retry = submit_run(clean, principal(clean, key), "db-fails", sub(), "t")
    assert not retry.replayed
    execute.execute_run(clean, str(retry.run.id))
    assert_invariants(clean)


def test_a_pack_that_fails_after_starting_pays_the_minimum_fee(clean, tenant):
    tenant_id, key = tenant
    run_id = str(submit_run(clean, principal(clean, key), "boom", sub({}, "boom", 100_000), "t").run.id)
    assert execute.execute_run(clean, run_id) == "failed:5000"
    row = run_row(clean, run_id)
    assert (row.status, row.error_code, row.actual_cost_micros) == ("FAILED", "PACK_ERROR", 5_000)
    assert books(clean, tenant_id).spent == 5_000
    assert_invariants(clean)


def test_a_worker_whose_lease_is_gone_at_finalize_does_not_finalize(clean, tenant):
    """Another process took the run over (its lease token changed) before the pack ran.

    The 0.3 s pack ends long before the first heartbeat tick, so what refuses
    here is the finalize CLAIM. The heartbeat noticing mid-pack and stopping the
    pack is tests/integration/test_lease_loss.py.
    """
    from sqlalchemy import text

    tenant_id, key = tenant
    run_id = str(submit_run(clean, principal(clean, key), "lease", sub({"seconds": 0.3}, "slow", 100_000), "t").run.id)

    original = clean.packs.get("slow").run

    def steal_then_run(inputs, progress):
        with clean.db.transaction() as session:
            session.execute(text("UPDATE runs SET lease_token = :t, version = version + 1 WHERE id = :id"),
                            {"t": str(uuid.uuid4()), "id": run_id})
        return original(inputs, progress)

    clean.packs.get("slow").run = steal_then_run
    try:
        assert execute.execute_run(clean, run_id) == "lease-lost"
    finally:
        clean.packs.get("slow").run = original
    row = run_row(clean, run_id)
    assert (row.status, row.finalize_stage, row.money_state) == ("PROCESSING", "NONE", "RESERVED")
    assert books(clean, tenant_id).held == 100_000
    assert_invariants(clean)  # in flight: invariant 3 is not asked of it


def test_dpp_audit_exits_nonzero_with_a_report_on_drift_and_rebuild_fixes_it(clean, tenant, settings):
    """The admin CLI as an operator runs it, in a subprocess with the same environment."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tenant_id, _ = tenant
    dpp_bin = str(Path(sys.executable).parent / "dpp")
    ok = subprocess.run([dpp_bin, "audit"], capture_output=True, text=True, env=os.environ)
    assert ok.returncode == 0 and "invariants 1-3   hold" in ok.stdout

    clean.budget.client.incrby(f"budget:{{{tenant_id}}}:balance_usd_micros", 1)  # Redis drifts by a micro
    drift = subprocess.run([dpp_bin, "audit"], capture_output=True, text=True, env=os.environ)
    assert drift.returncode == 1 and f"{tenant_id}: redis available 10000001 != ledger available 10000000" in drift.stdout

    rebuilt = subprocess.run([dpp_bin, "budget", "rebuild", "--tenant", tenant_id], capture_output=True, text=True)
    assert rebuilt.returncode == 0
    assert subprocess.run([dpp_bin, "audit", "--tenant", tenant_id], capture_output=True, text=True).returncode == 0
    assert_invariants(clean)
