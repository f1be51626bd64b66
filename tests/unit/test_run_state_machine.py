from datetime import datetime, timedelta, timezone

import pytest

from dpp.domain import runs as m
from dpp.domain.errors import InvalidTransition

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def snap(**kw):
    base = dict(
        run_id="r1", version=1, status=m.RunStatus.QUEUED, finalize_stage=m.FinalizeStage.NONE,
        money_state=m.MoneyState.RESERVED, lease_token=None, lease_expires_at=None,
        reserved_micros=1_000, minimum_fee_micros=50,
    )
    base.update(kw)
    return m.RunSnapshot(**base)


def processing(**kw):
    return snap(status=m.RunStatus.PROCESSING, lease_token="tok", lease_expires_at=NOW + timedelta(seconds=30), **kw)


def test_claim_lease_moves_queued_to_processing_with_a_lease():
    changes = m.claim_lease(snap(), token="tok", now=NOW, ttl_sec=60)
    assert changes["status"] is m.RunStatus.PROCESSING
    assert changes["lease_expires_at"] == NOW + timedelta(seconds=60)


@pytest.mark.parametrize("status", [m.RunStatus.PROCESSING, m.RunStatus.COMPLETED, m.RunStatus.FAILED])
def test_only_a_queued_run_can_be_claimed(status):
    with pytest.raises(InvalidTransition):
        m.claim_lease(snap(status=status), token="t", now=NOW, ttl_sec=60)


def test_a_run_being_failed_unstarted_cannot_be_claimed_by_a_worker():
    with pytest.raises(InvalidTransition):
        m.claim_lease(snap(finalize_stage=m.FinalizeStage.CLAIMED), token="t", now=NOW, ttl_sec=60)


def test_finalize_claim_needs_the_same_live_lease():
    assert m.claim_finalize(processing(), token="tok", now=NOW)["finalize_stage"] is m.FinalizeStage.CLAIMED
    with pytest.raises(InvalidTransition):
        m.claim_finalize(processing(), token="other", now=NOW)
    with pytest.raises(InvalidTransition):
        m.claim_finalize(processing(), token="tok", now=NOW + timedelta(seconds=31))
    with pytest.raises(InvalidTransition):
        m.claim_finalize(processing(finalize_stage=m.FinalizeStage.CLAIMED), token="tok", now=NOW)


def test_heartbeat_extends_only_the_holders_lease_before_finalize():
    assert m.extend_lease(processing(), token="tok", now=NOW, ttl_sec=60)["lease_expires_at"] == NOW + timedelta(seconds=60)
    with pytest.raises(InvalidTransition):
        m.extend_lease(processing(), token="x", now=NOW, ttl_sec=60)
    with pytest.raises(InvalidTransition):
        m.extend_lease(processing(finalize_stage=m.FinalizeStage.CLAIMED), token="tok", now=NOW, ttl_sec=60)


def test_commit_completed_settles_within_the_reservation():
    claimed = processing(finalize_stage=m.FinalizeStage.CLAIMED)
    changes = m.commit_completed(claimed, actual_cost_micros=700, now=NOW)
    assert changes["status"] is m.RunStatus.COMPLETED and changes["money_state"] is m.MoneyState.SETTLED
    with pytest.raises(InvalidTransition):
        m.commit_completed(claimed, actual_cost_micros=1_001, now=NOW)
    with pytest.raises(InvalidTransition):
        m.commit_completed(processing(), actual_cost_micros=1, now=NOW)


def test_a_terminal_run_never_fails_again():
    with pytest.raises(InvalidTransition):
        m.commit_failed(snap(status=m.RunStatus.COMPLETED), error_code=m.ErrorCode.PACK_ERROR,
                        error_message="x", charge_micros=0, now=NOW)


def test_failure_charge_is_minimum_fee_if_started_else_zero_and_capped():
    assert m.failure_charge(snap(), started=True) == 50
    assert m.failure_charge(snap(), started=False) == 0
    assert m.failure_charge(snap(reserved_micros=10), started=True) == 10


def test_lease_liveness():
    assert m.lease_live(processing(), NOW)
    assert not m.lease_live(processing(), NOW + timedelta(seconds=30))
    assert not m.lease_live(snap(), NOW)


def test_retention_boundary_instant_counts_as_expired():
    from types import SimpleNamespace

    from dpp.services.runs_query import _expired

    until = NOW + timedelta(days=90)
    run = SimpleNamespace(retention_until=until)
    assert _expired(run, until)
    assert not _expired(run, until - timedelta(microseconds=1))
    assert not _expired(SimpleNamespace(retention_until=None), until)


def test_reconcile_keeps_off_a_young_claim_and_a_live_lease():
    threshold = timedelta(minutes=5)
    young = snap(status=m.RunStatus.PROCESSING, finalize_stage=m.FinalizeStage.CLAIMED,
                 finalize_claimed_at=NOW - timedelta(seconds=12))
    assert m.reconcile_refusal(young, now=NOW, threshold=threshold) == (
        "claim is 12 s old, younger than the 300 s threshold")
    stuck = snap(status=m.RunStatus.PROCESSING, finalize_stage=m.FinalizeStage.CLAIMED,
                 finalize_claimed_at=NOW - timedelta(seconds=300))
    assert m.reconcile_refusal(stuck, now=NOW, threshold=threshold) is None
    assert m.reconcile_refusal(processing(), now=NOW, threshold=threshold) == (
        "lease is live for another 30 s (a worker holds it)")
    expired = snap(status=m.RunStatus.PROCESSING, lease_token="tok", lease_expires_at=NOW - timedelta(seconds=1))
    assert m.reconcile_refusal(expired, now=NOW, threshold=threshold) is None


def test_only_a_forced_claim_takes_a_live_lease_and_it_clears_the_token():
    with pytest.raises(InvalidTransition):
        m.claim_expired(processing(), now=NOW)
    changes = m.claim_expired(processing(), now=NOW, force=True)
    assert changes["finalize_stage"] is m.FinalizeStage.CLAIMED and changes["lease_token"] is None
