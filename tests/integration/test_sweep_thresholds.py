"""The sweeps at realistic thresholds: a young run or hold is left alone, an old one is taken.

tests/integration/test_sweeps.py sets every threshold to zero, so everything
stale is stale at once; that proves what a sweep does to an old run, never that
it leaves a young one (a worker's live lease, a finalize in progress, a message
still on its way, a submission between its hold and its record) alone. Here each
sweep runs with the production-like threshold, on one run on each side of it.
"""
from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import text

from dpp.adapters.budget import reserve_key
from dpp.bootstrap import Deps
from dpp.services import execute, finalize, sweeps
from tests.conftest import assert_invariants
from tests.integration.test_sweeps import MIN_FEE, leased, row, sql, submitted

LEASE_SEC, THRESHOLD_MIN, QUEUED_TIMEOUT_SEC, GRACE_SEC = 60, 5, 1800, 120
RESERVED = 500_000


@pytest.fixture
def real(clean):
    """The services with production-like thresholds (config defaults, pinned here)."""
    d = Deps(dataclasses.replace(
        clean.settings, worker_lease_ttl_sec=LEASE_SEC, reconcile_threshold_min=THRESHOLD_MIN,
        queued_timeout_sec=QUEUED_TIMEOUT_SEC, orphan_hold_grace_sec=GRACE_SEC, redrive_attempts=3,
    ))
    d.packs = clean.packs
    return d


def state(deps, tenant_id, run_id) -> dict:
    """Everything a sweep could move for one run: its row, its ledger rows, its Redis hold and receipt."""
    r = row(deps, run_id)
    with deps.db.transaction() as s:
        kinds = sorted(s.execute(text("SELECT kind FROM ledger_transfers WHERE run_id = :id"), {"id": run_id}).scalars())
    return {
        "row": (r.status, r.finalize_stage, r.money_state, r.version, r.error_code, r.actual_cost_micros),
        "transfers": kinds,
        "redis_hold": deps.budget.client.hgetall(reserve_key(tenant_id, run_id)),
        "redis_receipt": deps.budget.receipt(tenant_id, run_id),
    }


def test_the_lease_sweep_leaves_a_lease_that_has_not_expired_and_takes_one_that_has(real, tenant):
    tenant_id, key = tenant
    young, old = submitted(real, key, 2)
    leased(real, young), leased(real, old)
    # A worker whose heartbeat is a few seconds late, and one that died a second ago.
    sql(real, "UPDATE runs SET lease_expires_at = now() + interval '5 seconds' WHERE id = :id", id=young)
    sql(real, "UPDATE runs SET lease_expires_at = now() - interval '1 second' WHERE id = :id", id=old)
    before = state(real, tenant_id, young)

    assert sweeps.sweep_expired_leases(real).actions == {old: f"failed:LEASE_EXPIRED:{MIN_FEE}"}
    assert state(real, tenant_id, young) == before
    assert before["row"][0] == "PROCESSING" and before["redis_hold"][b"amount"] == str(RESERVED).encode()

    # Once its lease has run out as well, the same sweep takes it.
    sql(real, "UPDATE runs SET lease_expires_at = now() - interval '1 second' WHERE id = :id", id=young)
    assert sweeps.sweep_expired_leases(real).actions == {young: f"failed:LEASE_EXPIRED:{MIN_FEE}"}
    assert_invariants(real)


def test_the_reconciler_leaves_a_claim_younger_than_the_threshold_and_rolls_back_an_older_one(real, tenant):
    tenant_id, key = tenant
    young, old = submitted(real, key, 2)
    for run_id in (young, old):
        finalize.claim(real, run_id, leased(real, run_id))
    # One worker is four minutes into its upload; the other died six minutes ago.
    sql(real, "UPDATE runs SET finalize_claimed_at = now() - interval '4 minutes' WHERE id = :id", id=young)
    sql(real, "UPDATE runs SET finalize_claimed_at = now() - interval '6 minutes' WHERE id = :id", id=old)
    before = state(real, tenant_id, young)

    assert sweeps.reconcile_stuck(real).actions == {old: f"rolled_back:{MIN_FEE}"}
    assert state(real, tenant_id, young) == before
    assert before["row"][:3] == ("PROCESSING", "CLAIMED", "RESERVED")

    sql(real, "UPDATE runs SET finalize_claimed_at = now() - interval '6 minutes' WHERE id = :id", id=young)
    assert sweeps.reconcile_stuck(real).actions == {young: f"rolled_back:{MIN_FEE}"}
    assert_invariants(real)


def test_the_queue_sweep_leaves_a_run_queued_less_than_the_timeout_and_fails_an_older_one(real, tenant):
    tenant_id, key = tenant
    young, old = submitted(real, key, 2)
    # The timeout is shared by the re-drives: a publish every 1800 s / 3 = 10 minutes.
    # One message is slow (9 minutes in a backed-up queue); the other run has used
    # its three publishes, the last one 11 minutes ago, so its 30 minutes are up.
    sql(real, "UPDATE runs SET enqueued_at = now() - interval '9 minutes' WHERE id = :id", id=young)
    sql(real, "UPDATE runs SET enqueued_at = now() - interval '11 minutes', enqueue_attempts = 3 "
              "WHERE id = :id", id=old)
    before = state(real, tenant_id, young)

    assert sweeps.sweep_stale_queued(real).actions == {old: "failed:QUEUE_TIMEOUT:0"}
    assert state(real, tenant_id, young) == before
    assert before["row"][0] == "QUEUED" and before["transfers"] == ["RESERVE"]

    # The slow message arrives: the young run is still the worker's to run.
    assert execute.execute_run(real, young).startswith("completed:")
    assert_invariants(real)


def test_the_orphan_sweep_leaves_a_hold_younger_than_the_grace_and_releases_an_older_one(real, tenant):
    """Holds with no run row: one submission is between its hold and its insert, one died there."""
    tenant_id, _ = tenant
    young, old = "00000000-0000-0000-0000-0000000000a1", "00000000-0000-0000-0000-0000000000a2"
    real.budget.reserve(tenant_id, young, 300_000)
    real.budget.reserve(tenant_id, old, 200_000)
    at = int(real.budget.client.hget(reserve_key(tenant_id, old), "reserved_at"))
    real.budget.client.hset(reserve_key(tenant_id, young), "reserved_at", at - 60_000)  # a minute old
    real.budget.client.hset(reserve_key(tenant_id, old), "reserved_at", at - (GRACE_SEC + 1) * 1000)
    young_hold = real.budget.client.hgetall(reserve_key(tenant_id, young))

    assert sweeps.release_orphan_holds(real).actions == {old: "released:200000"}
    assert real.budget.client.hgetall(reserve_key(tenant_id, young)) == young_hold
    assert young in [run_id for run_id, _, _ in real.budget.holds(tenant_id)]
    assert real.budget.available(tenant_id) == 10_000_000 - 300_000

    real.budget.client.hset(reserve_key(tenant_id, young), "reserved_at", at - (GRACE_SEC + 1) * 1000)
    assert sweeps.release_orphan_holds(real).actions == {young: "released:300000"}
    assert_invariants(real)
