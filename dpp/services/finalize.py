"""Ending a run: the two-phase finalize and every other way a run settles.

CLAIM  (finalize_stage=CLAIMED, only under a live lease)
  -> upload pack_envelope.json with its cost in the object metadata
COMMIT (Redis settle -> ledger CHARGE + RELEASE, run terminal, usage) — in
that order, each step idempotent, so the reconciler can re-run COMMIT after
a crash at any point and get the same single settlement.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from dpp import logs, metrics
from dpp.adapters.repository import RunRepository, record_usage, snapshot, utcnow
from dpp.adapters.results import result_key
from dpp.domain import proof
from dpp.domain import runs as machine
from dpp.domain.canonical import canonical_json, sha256_hex
from dpp.domain.errors import InvalidTransition, LeaseLost
from dpp.domain.money import format_usd
from dpp.domain.packs.base import PackResult
from dpp.domain.runs import ErrorCode, FinalizeStage, RunStatus
from dpp.faults import fault_point
from dpp.services import admissions, ledger

log = logging.getLogger(__name__)

ALERT_CHANNEL = logs.ALERT_CHANNEL  # re-exported: the sweeps and the tests read it here


@dataclass(frozen=True)
class Outcome:
    """What a finalize did; `settled` is False when it found the work already done."""

    run_id: str
    status: str
    charge_micros: int
    settled: bool


def claim(deps, run_id: str, lease_token: str):
    """Phase 1. Raises LeaseLost when this worker may no longer finalize.

    Returns the run row as read by the claim and the database's time of it.
    """
    with deps.db.transaction() as session:
        repo = RunRepository(session)
        row, now = repo.get_with_now(run_id)
        try:
            changes = machine.claim_finalize(snapshot(row), token=lease_token, now=now)
        except InvalidTransition as exc:
            raise LeaseLost(str(exc)) from exc
        if not repo.apply(snapshot(row), changes):
            raise LeaseLost("run changed under the finalize claim")
    return row, now


def envelope(deps, row, result: PackResult, finished_at) -> bytes:
    """The stored result, a decision proof: canonical JSON, signed (dpp.domain.proof)."""
    key, key_id = deps.settings.signing
    document = {
        "envelope_version": "1",
        "run_id": str(row.id),
        "tenant_id": row.tenant_id,
        "pack_type": row.pack_type,
        "pack_version": row.pack_version,
        "method": result.output.get("method") if isinstance(result.output, dict) else None,
        "inputs": row.inputs,
        "input_hash": sha256_hex(row.inputs),
        "result": result.output,
        "actual_cost_usd": format_usd(min(result.actual_cost_micros, row.reserved_micros)),
        "created_at": row.created_at.isoformat(),
        "finished_at": finished_at.isoformat(),
    }
    return canonical_json(proof.sign(document, key, key_id))


def complete(deps, run_id: str, lease_token: str, result: PackResult) -> Outcome:
    """CLAIM -> upload -> COMMIT for a pack that finished."""
    row, now = claim(deps, run_id, lease_token)  # now: the finish time the envelope records
    fault_point("after_finalize_claim", row.tenant_id)
    charge = min(result.actual_cost_micros, row.reserved_micros)
    key = result_key(row.tenant_id, run_id)
    deps.results.put(key, envelope(deps, row, result, now), charge)
    fault_point("after_s3_upload", row.tenant_id)
    return commit(deps, run_id, RunStatus.COMPLETED, charge, result_key=key)


def fail_started(deps, run_id: str, lease_token: str, code: ErrorCode, message: str) -> Outcome:
    """A pack that started and failed: CLAIM, then COMMIT at the minimum fee."""
    row, _ = claim(deps, run_id, lease_token)
    snap = snapshot(row)
    return commit(deps, run_id, RunStatus.FAILED, machine.failure_charge(snap, started=True), code=code, message=message)


def fail_unstarted(deps, run_id: str, code: ErrorCode, message: str) -> Outcome | None:
    """A run that never started (enqueue failed, stale in the queue): charge 0.

    None when a worker claimed the run first: then it is the worker's to end.
    """
    with deps.db.transaction() as session:
        repo = RunRepository(session)
        snap = snapshot(repo.get(run_id))
        try:
            changes = machine.claim_unstarted(snap, now=utcnow(session))
        except InvalidTransition:
            return None
        if not repo.apply(snap, changes):
            return None
    return commit(deps, run_id, RunStatus.FAILED, 0, code=code, message=message, from_queued=True)


def commit(
    deps,
    run_id: str,
    status: RunStatus,
    charge_wanted_micros: int,
    *,
    result_key: str | None = None,
    code: ErrorCode | None = None,
    message: str = "",
    from_queued: bool = False,
) -> Outcome:
    """Phase 2 (and the single settlement path for every terminal state)."""
    with deps.db.transaction() as session:
        row = RunRepository(session).get(run_id)
        if row.finalize_stage == FinalizeStage.COMMITTED.value:
            return Outcome(run_id, row.status, row.actual_cost_micros or 0, settled=False)
        tenant_id, reserved = row.tenant_id, row.reserved_micros

    settlement = ledger.settle_in_redis(deps, tenant_id, run_id, reserved, charge_wanted_micros)
    fault_point("after_redis_settle", tenant_id)
    if settlement.charge_micros != min(charge_wanted_micros, reserved):
        # Redis already settled this run at another price: two stories about one
        # run's money. Nobody may pick one silently (SPEC §2 invariant 5).
        flag_audit_required(
            deps, run_id,
            f"redis receipt charged {settlement.charge_micros}, this settlement wanted "
            f"{min(charge_wanted_micros, reserved)}",
        )
        return Outcome(run_id, "AUDIT_REQUIRED", settlement.charge_micros, settled=False)

    with deps.db.transaction() as session:
        repo = RunRepository(session)
        row, now = repo.get_with_now(run_id, for_update=True)
        snap = snapshot(row)
        if snap.finalize_stage is FinalizeStage.COMMITTED:
            return Outcome(run_id, row.status, row.actual_cost_micros or 0, settled=False)
        if status is RunStatus.COMPLETED:
            changes = machine.commit_completed(snap, actual_cost_micros=settlement.charge_micros, now=now)
            retention_days = _retention_days(session, row.tenant_id)
            changes.update(result_key=result_key, retention_until=now + timedelta(days=retention_days), progress=1.0)
        else:
            changes = machine.commit_failed(
                snap, error_code=code, error_message=message, charge_micros=settlement.charge_micros, now=now
            )
            if from_queued:
                # Never started: give the idempotency key back (docs/api.md).
                changes["idempotency_key"] = None
        ledger.record_settlement(session, row.tenant_id, run_id, settlement)
        if not repo.apply(snap, changes):
            raise InvalidTransition("run changed during commit")  # rolls the ledger rows back too
        record_usage(
            session,
            row.tenant_id,
            now,
            completed=status is RunStatus.COMPLETED,
            charged=settlement.charge_micros,
            released=settlement.release_micros,
        )
    fault_point("after_ledger_commit", tenant_id)
    metrics.RUNS_FINISHED.labels(status.value, code.value if code else "").inc()
    metrics.MONEY_CHARGED.inc(settlement.charge_micros)
    metrics.MONEY_RELEASED.inc(settlement.release_micros)
    log.info(
        "run settled",
        extra={"run_id": run_id, "tenant_id": tenant_id, "status": status.value, "charge_micros": settlement.charge_micros},
    )
    return Outcome(run_id, status.value, settlement.charge_micros, settled=True)


def _retention_days(session, tenant_id: str) -> int:
    from dpp.adapters.repository import TenantRepository

    return TenantRepository(session).retention_days(tenant_id)


def flag_audit_required(deps, run_id: str, reason: str) -> str:
    """Mark, alert, count — and change nothing else (SPEC §2 invariant 5)."""
    with deps.db.transaction() as session:
        repo = RunRepository(session)
        row = repo.get(run_id, for_update=True)
        snap = snapshot(row)
        repo.apply(snap, machine.mark_audit_required(snap, reason=reason))
        # Until someone explains it, the tenant takes no new money in (its runs in
        # flight finish; docs/runbook.md "A tenant is frozen").
        admissions.freeze_tenant(session, row.tenant_id, f"run {run_id} AUDIT_REQUIRED: {reason}")
    log.critical(
        "AUDIT_REQUIRED: %s", reason,
        extra={"run_id": run_id, "alert_channel": ALERT_CHANNEL, "reason": reason},
    )
    metrics.AUDIT_REQUIRED.labels("run").inc()
    metrics.RECONCILE_ACTIONS.labels("audit_required").inc()
    return "audit-required"
