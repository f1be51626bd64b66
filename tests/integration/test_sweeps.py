"""The sweeps on real PostgreSQL, Redis and S3: each fault state they exist for,
resolved exactly once, and the money invariants afterwards."""
from __future__ import annotations

import dataclasses
import logging
import threading

import pytest
from sqlalchemy import text
from sqlalchemy.dialects import postgresql

from dpp.adapters.repository import RunRepository
from dpp.adapters.results import result_key
from dpp.bootstrap import Deps
from dpp.domain.errors import ResultGone
from dpp.services import execute, finalize, runs_query, sweeps, tenants
from dpp.services.heartbeat import Heartbeat
from dpp.services.submit import Submission, submit_run
from tests.conftest import assert_invariants
from tests.support.inputs import DECISION

MIN_FEE = 5_000  # pro plan


@pytest.fixture
def fast(clean):
    """The same services with thresholds of zero: every stale state is stale now."""
    d = Deps(dataclasses.replace(clean.settings, reconcile_threshold_min=0, queued_timeout_sec=0, redrive_attempts=1))
    d.packs = clean.packs
    return d


def submitted(deps, key, n=1):
    who = tenants.authenticate(deps, key)
    return [str(submit_run(deps, who, f"k{i}", Submission("decision", DECISION, 500_000, ""), "t").run.id) for i in range(n)]


def leased(deps, run_id) -> str:
    token, _ = execute._claim_lease(deps, run_id)
    assert token.startswith("lease:")
    return token.removeprefix("lease:")


def sql(deps, statement, **params):
    with deps.db.transaction() as s:
        return s.execute(text(statement), params)


def row(deps, run_id):
    with deps.db.transaction() as s:
        return RunRepository(s).get(run_id)


def test_an_expired_lease_fails_the_run_at_the_minimum_fee(fast, tenant):
    tenant_id, key = tenant
    (run_id,) = submitted(fast, key)
    leased(fast, run_id)
    sql(fast, "UPDATE runs SET lease_expires_at = now() - interval '1 second' WHERE id = :id", id=run_id)

    report = sweeps.sweep_expired_leases(fast)
    assert report.actions == {run_id: f"failed:LEASE_EXPIRED:{MIN_FEE}"}
    r = row(fast, run_id)
    assert (r.status, r.error_code, r.actual_cost_micros) == ("FAILED", "LEASE_EXPIRED", MIN_FEE)
    assert sweeps.sweep_expired_leases(fast).claimed == 0  # idempotent
    assert_invariants(fast)


def test_a_live_lease_is_left_alone(fast, tenant):
    _, key = tenant
    (run_id,) = submitted(fast, key)
    leased(fast, run_id)
    assert sweeps.sweep_expired_leases(fast).claimed == 0
    assert row(fast, run_id).status == "PROCESSING"


def test_two_lease_sweeps_at_once_settle_each_run_once(fast, tenant):
    tenant_id, key = tenant
    ids = submitted(fast, key, 6)
    for run_id in ids:
        leased(fast, run_id)
    sql(fast, "UPDATE runs SET lease_expires_at = now() - interval '1 second'")
    reports = []
    threads = [threading.Thread(target=lambda: reports.append(sweeps.sweep_expired_leases(fast))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(run for r in reports for run in r.actions) == sorted(ids)
    assert sum(r.claimed for r in reports) == 6
    assert_invariants(fast)


def test_a_claim_without_an_upload_is_rolled_back(fast, tenant):
    _, key = tenant
    (run_id,) = submitted(fast, key)
    finalize.claim(fast, run_id, leased(fast, run_id))  # the worker died right after CLAIM
    assert sweeps.reconcile_stuck(fast).actions == {run_id: f"rolled_back:{MIN_FEE}"}
    r = row(fast, run_id)
    assert (r.status, r.error_code, r.actual_cost_micros) == ("FAILED", "ROLLED_BACK", MIN_FEE)
    assert_invariants(fast)


def test_a_claim_with_an_upload_is_rolled_forward_at_the_receipts_cost(fast, tenant):
    tenant_id, key = tenant
    (run_id,) = submitted(fast, key)
    finalize.claim(fast, run_id, leased(fast, run_id))
    fast.results.put(result_key(tenant_id, run_id), b'{"result": {}}', 7_777)  # died after the upload
    assert sweeps.reconcile_stuck(fast).actions == {run_id: "rolled_forward:7777"}
    r = row(fast, run_id)
    assert (r.status, r.actual_cost_micros, r.result_key) == ("COMPLETED", 7_777, result_key(tenant_id, run_id))
    assert_invariants(fast)


def test_a_settled_redis_receipt_with_no_ledger_commit_is_finished(fast, tenant):
    """Died after the Redis settle, before the ledger: the reconciler replays the receipt."""
    tenant_id, key = tenant
    (run_id,) = submitted(fast, key)
    finalize.claim(fast, run_id, leased(fast, run_id))
    fast.results.put(result_key(tenant_id, run_id), b"{}", 6_000)
    fast.budget.settle(tenant_id, run_id, 6_000)
    assert sweeps.reconcile_stuck(fast).actions == {run_id: "rolled_forward:6000"}
    assert fast.budget.available(tenant_id) == 10_000_000 - 6_000
    assert_invariants(fast)


def test_a_contradictory_receipt_is_flagged_not_fixed(fast, tenant, caplog):
    tenant_id, key = tenant
    (run_id,) = submitted(fast, key)
    finalize.claim(fast, run_id, leased(fast, run_id))
    fast.results.put(result_key(tenant_id, run_id), b"{}", 900_000)  # more than the 500,000 reserved
    with caplog.at_level(logging.CRITICAL):
        assert sweeps.reconcile_stuck(fast).actions == {run_id: "audit-required"}
    record = next(r for r in caplog.records if r.levelno == logging.CRITICAL and r.getMessage().startswith("AUDIT_REQUIRED"))
    assert record.alert_channel and record.run_id == run_id
    r = row(fast, run_id)
    assert (r.money_state, r.status, r.finalize_stage) == ("AUDIT_REQUIRED", "PROCESSING", "CLAIMED")
    with fast.db.transaction() as s:
        held = s.execute(text("SELECT held_micros FROM tenant_balances WHERE tenant_id = :t"), {"t": tenant_id}).scalar()
    assert held == 500_000  # nothing moved
    assert sweeps.reconcile_stuck(fast).claimed == 0  # and no sweep touches it again
    report = sweeps.audit_tenant(fast, tenant_id)
    assert not report["ok"] and any("AUDIT_REQUIRED" in v for v in report["violations"])


def test_a_run_stuck_in_the_queue_fails_at_zero_and_frees_its_key(fast, tenant):
    tenant_id, key = tenant
    (run_id,) = submitted(fast, key)
    assert sweeps.sweep_stale_queued(fast).actions == {run_id: "failed:QUEUE_TIMEOUT:0"}
    r = row(fast, run_id)
    assert (r.status, r.actual_cost_micros, r.idempotency_key) == ("FAILED", 0, None)
    assert execute.execute_run(fast, run_id) == "duplicate:terminal"  # the late message is dropped
    assert_invariants(fast)


def test_expired_results_are_purged_and_the_owner_then_gets_410(fast, tenant):
    tenant_id, key = tenant
    (run_id,) = submitted(fast, key)
    execute.execute_run(fast, run_id)
    stored = row(fast, run_id).result_key
    sql(fast, "UPDATE runs SET retention_until = now() - interval '1 second' WHERE id = :id", id=run_id)
    assert sweeps.purge_expired_results(fast).actions == {run_id: "purged"}
    assert fast.results.head(stored) is None and row(fast, run_id).result_key is None
    with pytest.raises(ResultGone):
        runs_query.result(fast, tenant_id, run_id)
    assert_invariants(fast)


def test_reconcile_run_reports_and_resolves_one_run(fast, tenant):
    tenant_id, key = tenant
    (run_id,) = submitted(fast, key)
    leased(fast, run_id)
    sql(fast, "UPDATE runs SET lease_expires_at = now() - interval '1 second' WHERE id = :id", id=run_id)
    report = sweeps.reconcile_run(fast, run_id)
    assert report["before"]["status"] == "PROCESSING" and report["before"]["lease_expired"]
    assert report["action"] == f"rolled_back:{MIN_FEE}"
    assert report["after"]["status"] == "FAILED" and report["after"]["redis_receipt"]["charge"] == MIN_FEE
    assert sweeps.reconcile_run(fast, run_id)["action"] == "nothing-to-do"
    assert sweeps.reconcile_run(fast, "00000000-0000-0000-0000-000000000000") == {
        "run_id": "00000000-0000-0000-0000-000000000000", "found": False}
    assert sweeps.audit_tenant(fast, tenant_id)["ok"]
    assert_invariants(fast)


def test_heartbeat_extends_the_lease_until_the_lease_is_taken(fast, tenant):
    _, key = tenant
    (run_id,) = submitted(fast, key)
    token = leased(fast, run_id)
    before = row(fast, run_id).lease_expires_at
    beat = Heartbeat(fast, run_id, token)
    assert beat.beat() and row(fast, run_id).lease_expires_at > before
    sql(fast, "UPDATE runs SET lease_token = gen_random_uuid(), version = version + 1 WHERE id = :id", id=run_id)
    assert not beat.beat()


def test_queue_depth_is_read_from_sqs(fast, tenant):
    _, key = tenant
    submitted(fast, key, 2)
    assert sweeps.record_queue_depth(fast)["visible"] == 2


@pytest.mark.parametrize("builder", ["expired_leases", "stale_queued", "stuck_claims", "expired_results"])
def test_sweep_queries_use_partial_indexes_not_a_scan_of_all_runs(clean, builder):
    stmt = {
        "expired_leases": lambda: sweeps.expired_leases_query(100),
        "stale_queued": lambda: sweeps.stale_queued_query(100, 60),
        "stuck_claims": lambda: sweeps.stuck_claims_query(100, 5),
        "expired_results": lambda: sweeps.expired_results_query(100),
    }[builder]()
    compiled = stmt.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
    with clean.db.transaction() as s:
        # Forbidding sequential scans makes the planner use an index if one
        # applies; a Seq Scan that remains means no index fits the query.
        s.execute(text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(r[0] for r in s.execute(text(f"EXPLAIN {compiled}")))
    assert "Seq Scan on runs" not in plan, plan
    assert "Index" in plan, plan


def test_a_hold_whose_run_was_never_recorded_is_released_after_the_grace(fast, tenant):
    """The API died between the Redis hold and the run row (fault point after_reserve)."""
    tenant_id, key = tenant
    (recorded,) = submitted(fast, key)  # a live, recorded hold: never touched
    fast.budget.reserve(tenant_id, "00000000-0000-0000-0000-00000000dead", 300_000)
    assert fast.budget.available(tenant_id) == 10_000_000 - 500_000 - 300_000

    patient = Deps(dataclasses.replace(fast.settings, orphan_hold_grace_sec=3600))
    assert sweeps.release_orphan_holds(patient).claimed == 0  # too young to judge

    eager = Deps(dataclasses.replace(fast.settings, orphan_hold_grace_sec=0))
    report = sweeps.release_orphan_holds(eager)
    assert report.actions == {"00000000-0000-0000-0000-00000000dead": "released:300000"}
    assert fast.budget.available(tenant_id) == 10_000_000 - 500_000
    assert fast.budget.reservation(tenant_id, recorded) == 500_000
    execute.execute_run(fast, recorded)
    assert_invariants(fast)


def test_a_run_whose_message_is_lost_is_redriven_then_completes(clean, tenant):
    """The broker lost the message (purge, restart, dead-letter): the sweep publishes
    it again before it would ever fail the run, and a worker then completes it."""
    from tests.conftest import drain_queue
    from dpp.adapters.aws import client

    tenant_id, key = tenant
    redriving = Deps(dataclasses.replace(clean.settings, queued_timeout_sec=0, redrive_attempts=3))
    redriving.packs = clean.packs
    (run_id,) = submitted(redriving, key)
    sqs = client(clean.settings, "sqs", clean.settings.sqs_endpoint_url)
    assert drain_queue(sqs, clean.settings.sqs_queue_url) == 1           # the message is gone
    assert sweeps.sweep_stale_queued(redriving).actions == {run_id: "redriven:2"}
    r = row(clean, run_id)
    assert (r.status, r.enqueue_attempts, r.money_state) == ("QUEUED", 2, "RESERVED")
    assert drain_queue(sqs, clean.settings.sqs_queue_url) == 1           # published again
    assert execute.execute_run(redriving, run_id).startswith("completed:")
    assert_invariants(clean)


def test_a_run_out_of_redrive_attempts_fails_at_zero(clean, tenant):
    tenant_id, key = tenant
    redriving = Deps(dataclasses.replace(clean.settings, queued_timeout_sec=0, redrive_attempts=2))
    redriving.packs = clean.packs
    (run_id,) = submitted(redriving, key)
    assert sweeps.sweep_stale_queued(redriving).actions == {run_id: "redriven:2"}
    assert sweeps.sweep_stale_queued(redriving).actions == {run_id: "failed:QUEUE_TIMEOUT:0"}
    r = row(clean, run_id)
    assert (r.status, r.actual_cost_micros, r.enqueue_attempts) == ("FAILED", 0, 2)
    assert execute.execute_run(redriving, run_id) == "duplicate:terminal"
    assert_invariants(clean)


def test_a_young_queued_run_is_neither_redriven_nor_failed(clean, tenant):
    tenant_id, key = tenant
    (run_id,) = submitted(clean, key)        # the default timeout: 1800 s, three shares of 600 s
    assert sweeps.sweep_stale_queued(clean).actions == {}
    assert row(clean, run_id).enqueue_attempts == 1
    assert_invariants(clean)


def test_a_redrive_that_cannot_publish_counts_its_attempt_and_moves_no_money(clean, tenant, monkeypatch):
    """SQS is down when the sweep re-drives: the attempt is spent, the run stays
    QUEUED with its reservation, and the next share tries again."""
    from dpp.domain.errors import DependencyUnavailable

    tenant_id, key = tenant
    redriving = Deps(dataclasses.replace(clean.settings, queued_timeout_sec=0, redrive_attempts=3))
    redriving.packs = clean.packs
    (run_id,) = submitted(redriving, key)

    def broker_down(*args, **kwargs):
        raise DependencyUnavailable("queue", "test: SQS is down")

    monkeypatch.setattr(redriving.queue, "enqueue_run", broker_down)
    assert sweeps.sweep_stale_queued(redriving).actions == {run_id: "redrive-failed:2:queue"}
    r = row(clean, run_id)
    assert (r.status, r.enqueue_attempts, r.money_state, r.reserved_micros) == ("QUEUED", 2, "RESERVED", 500_000)
    assert_invariants(clean)
    monkeypatch.undo()
    assert sweeps.sweep_stale_queued(redriving).actions == {run_id: "redriven:3"}
    assert execute.execute_run(redriving, run_id).startswith("completed:")
    assert_invariants(clean)
