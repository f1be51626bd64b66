"""The sweeps that end what crashed workers and lost messages left behind (SPEC §3).

Each sweep claims a bounded batch with `FOR UPDATE SKIP LOCKED` and moves every
claimed run with the state machine's compare-and-set in that same transaction,
so two copies of a sweep running at once take disjoint runs. The claimed runs
are then ended through `finalize.commit`, the one settlement path, which is
idempotent: a sweep killed half-way is finished by the next one (or by
`reconcile_stuck`, since a claimed run is CLAIMED).

Queries filter on the partial indexes' predicates (`orm.Run` indexes), so their
cost grows with the runs in flight, not with the millions that ended.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import func, select

from dpp import metrics, telemetry
from dpp.adapters import orm
from dpp.adapters.repository import RunRepository, fence_tenant, snapshot, utcnow
from dpp.adapters.results import result_key
from dpp.domain import runs as machine
from dpp.domain.errors import DependencyUnavailable, InvalidTransition, UnknownPackType
from dpp.domain.packs.base import time_limits
from dpp.domain.runs import ErrorCode, FinalizeStage, MoneyState, RunStatus, is_run_id
from dpp.faults import fault_point
from dpp.services import admissions, finalize, ledger
from dpp.services.finalize import ALERT_CHANNEL, flag_audit_required
from dpp.services.audit import audit

log = logging.getLogger(__name__)



@dataclass
class SweepReport:
    sweep: str
    claimed: int = 0
    actions: dict[str, str] = field(default_factory=dict)  # run_id -> what happened

    def as_dict(self) -> dict:
        return {"sweep": self.sweep, "claimed": self.claimed, "actions": self.actions}


@dataclass(frozen=True)
class Claimed:
    run_id: str
    tenant_id: str
    trace_id: str | None
    pack_type: str = ""

    def scope(self, sweep: str):
        """Log and trace this run's settlement in the run's own trace (dpp.telemetry)."""
        return telemetry.run_scope(f"dpp.{sweep}", self.trace_id, self.run_id, self.tenant_id)


def _claim_batch(deps, stmt, transition) -> list[Claimed]:
    """Lock a batch (skipping rows another sweep holds) and move each by CAS."""
    claimed = []
    with deps.db.transaction() as session:
        repo = RunRepository(session)
        now = utcnow(session)
        rows = list(session.execute(stmt.with_for_update(skip_locked=True)).scalars())
        fault_point("sweep_between_read_and_write", *{row.tenant_id for row in rows})
        for row in rows:
            snap = snapshot(row)
            try:
                changes = transition(snap, now)
            except InvalidTransition:
                continue
            if repo.apply(snap, changes):
                claimed.append(Claimed(str(row.id), row.tenant_id, row.trace_id, row.pack_type))
    return claimed


def expired_leases_query(limit: int):
    return (
        select(orm.Run)
        .where(orm.Run.status == "PROCESSING", orm.Run.finalize_stage == "NONE", orm.Run.lease_expires_at < _db_now())
        .order_by(orm.Run.lease_expires_at)
        .limit(limit)
    )


def stale_queued_query(limit: int, timeout_sec: float):
    """QUEUED runs whose last publish is older than `timeout_sec` (one re-drive's share)."""
    return (
        select(orm.Run)
        .where(
            orm.Run.status == "QUEUED",
            orm.Run.finalize_stage == "NONE",
            orm.Run.enqueued_at < _db_now() - timedelta(seconds=timeout_sec),
        )
        .order_by(orm.Run.enqueued_at)
        .limit(limit)
    )


def stuck_claims_query(limit: int, threshold_min: float):
    return (
        select(orm.Run)
        .where(
            orm.Run.finalize_stage == "CLAIMED",
            orm.Run.finalize_claimed_at < _db_now() - timedelta(minutes=threshold_min),
            orm.Run.money_state != MoneyState.AUDIT_REQUIRED.value,
        )
        .order_by(orm.Run.finalize_claimed_at)
        .limit(limit)
    )


def expired_results_query(limit: int):
    return (
        select(orm.Run)
        .where(orm.Run.result_key.is_not(None), orm.Run.retention_until <= _db_now())
        .order_by(orm.Run.retention_until)
        .limit(limit)
    )


def sweep_expired_leases(deps) -> SweepReport:
    """PROCESSING, lease expired, no finalize claim -> FAILED LEASE_EXPIRED, minimum fee."""
    report = SweepReport("sweep_expired_leases")
    stmt = expired_leases_query(deps.settings.reaper_scan_limit)
    claimed = _claim_batch(deps, stmt, lambda snap, now: machine.claim_expired(snap, now=now))
    report.claimed = len(claimed)
    for run in claimed:
        with run.scope(report.sweep):
            snap = _snapshot(deps, run.run_id)
            outcome = finalize.commit(
                deps, run.run_id, RunStatus.FAILED, machine.failure_charge(snap, started=True),
                code=ErrorCode.LEASE_EXPIRED, message="the worker's lease expired before it finalized",
            )
            metrics.LEASE_EXPIRIES.inc()
            metrics.SWEEP_RUNS.labels(report.sweep).inc()
            report.actions[run.run_id] = f"failed:LEASE_EXPIRED:{outcome.charge_micros}"
            log.warning("lease expired: run failed by the sweep", extra={"action": report.actions[run.run_id]})
    return report


def sweep_stale_queued(deps) -> SweepReport:
    """QUEUED too long: its message may be lost (broker restart, purge, dead-lettered).

    Every `queued_timeout_sec / redrive_attempts` with no worker taking the run,
    its message is published again, idempotently (the lease claim lets one worker
    in; a duplicate is dropped). After the last attempt's share it ends FAILED
    QUEUE_TIMEOUT, charge 0 — so a run never waits more than `queued_timeout_sec`
    plus one sweep interval without a worker (docs/CHAOS.md).
    """
    report = SweepReport("sweep_stale_queued")
    attempts = deps.settings.redrive_attempts
    share = deps.settings.queued_timeout_sec / attempts
    stmt = stale_queued_query(deps.settings.reaper_scan_limit, share)

    redriven: dict[str, int] = {}  # run id -> its publish number, for the runs re-driven now

    def redrive_or_end(snap, now):
        if snap.enqueue_attempts < attempts:
            changes = machine.redrive(snap, now=now, max_attempts=attempts)
            redriven[snap.run_id] = changes["enqueue_attempts"]
            return changes
        return machine.claim_unstarted(snap, now=now)

    claimed = _claim_batch(deps, stmt, redrive_or_end)
    report.claimed = len(claimed)
    for run in claimed:
        with run.scope(report.sweep):
            if run.run_id in redriven:
                publish = redriven[run.run_id]
                try:
                    deps.queue.enqueue_run(run.run_id, run.trace_id or "", _time_limits(deps, run.pack_type))
                except DependencyUnavailable as exc:  # the broker is down: the next share tries again
                    report.actions[run.run_id] = f"redrive-failed:{publish}:{exc.dependency}"
                    continue
                metrics.REDRIVES.inc()
                report.actions[run.run_id] = f"redriven:{publish}"
                log.warning("run re-driven: its message may be lost", extra={"action": report.actions[run.run_id]})
                continue
            outcome = finalize.commit(
                deps, run.run_id, RunStatus.FAILED, 0, code=ErrorCode.QUEUE_TIMEOUT,
                message="the run waited in the queue too long and never started", from_queued=True,
            )
            metrics.SWEEP_RUNS.labels(report.sweep).inc()
            report.actions[run.run_id] = f"failed:QUEUE_TIMEOUT:{outcome.charge_micros}"
            log.warning("never started: run failed by the sweep", extra={"action": report.actions[run.run_id]})
    return report


def reconcile_stuck(deps) -> SweepReport:
    """CLAIMED for longer than the threshold: roll forward from S3, or roll back."""
    report = SweepReport("reconcile_stuck")
    stmt = stuck_claims_query(deps.settings.reconcile_scan_limit, deps.settings.reconcile_threshold_min)
    claimed = _claim_batch(deps, stmt, lambda snap, now: machine.take_over_claim(snap, now=now))
    report.claimed = len(claimed)
    for run in claimed:
        with run.scope(report.sweep):
            report.actions[run.run_id] = reconcile_one(deps, run.run_id)
            metrics.SWEEP_RUNS.labels(report.sweep).inc()
            log.warning("stuck finalize reconciled", extra={"action": report.actions[run.run_id]})
    return report


def reconcile_one(deps, run_id: str) -> str:
    """Resolve one CLAIMED run from the evidence in S3. Idempotent; never guesses.

    S3 object with a sane cost receipt -> roll forward at that cost.
    No S3 object                      -> roll back: FAILED, minimum fee if the
                                         pack had started, 0 if it never did.
    Anything contradictory            -> AUDIT_REQUIRED, for a human.
    """
    with deps.db.transaction() as session:
        row = RunRepository(session).get(run_id)
    if row is None:
        return "unknown-run"
    snap = snapshot(row)
    if snap.finalize_stage is FinalizeStage.COMMITTED:
        return f"already-settled:{row.status}"
    if snap.money_state is MoneyState.AUDIT_REQUIRED:
        return "audit-required"
    if snap.finalize_stage is not FinalizeStage.CLAIMED:
        return f"not-claimed:{snap.status.value}"

    if snap.status is RunStatus.QUEUED:  # claimed as never started, then interrupted
        finalize.commit(deps, run_id, RunStatus.FAILED, 0, code=ErrorCode.ROLLED_BACK,
                        message="interrupted before it started; settled at 0", from_queued=True)
        metrics.RECONCILE_ACTIONS.labels("rolled_back_unstarted").inc()
        return "rolled_back:0"

    stored = deps.results.head(result_key(row.tenant_id, run_id))
    if stored is None:
        charge = machine.failure_charge(snap, started=True)
        outcome = finalize.commit(deps, run_id, RunStatus.FAILED, charge, code=ErrorCode.ROLLED_BACK,
                                  message="finalize was interrupted before the result was stored")
        metrics.RECONCILE_ACTIONS.labels("rolled_back").inc()
        return f"rolled_back:{outcome.charge_micros}"
    if not 0 <= stored.actual_cost_micros <= snap.reserved_micros:
        return flag_audit_required(
            deps, run_id,
            f"S3 cost receipt {stored.actual_cost_micros} is outside 0..{snap.reserved_micros}",
        )
    outcome = finalize.commit(deps, run_id, RunStatus.COMPLETED, stored.actual_cost_micros, result_key=stored.key)
    metrics.RECONCILE_ACTIONS.labels("rolled_forward").inc()
    return f"rolled_forward:{outcome.charge_micros}"


def _time_limits(deps, pack_type: str) -> tuple[float, float] | None:
    try:
        return time_limits(deps.packs.get(pack_type))
    except UnknownPackType:  # a pack no longer served: the task's defaults
        return None


def release_orphan_holds(deps) -> SweepReport:
    """Redis holds, older than the grace period, that no live run explains.

    - An orphan: submission holds in Redis, then records the run and its RESERVE
      in one transaction; a process killed in between leaves a hold no ledger row
      explains. Released whole.
    - A hold of a run the ledger has already settled: Redis was wiped after the
      run's Redis settle and restored (hold and all, from a ledger whose COMMIT was
      still pending) before that COMMIT landed. Settled again in Redis at the
      ledger's charge, so exactly the ledger's release comes back.
    Each tenant is handled under its fence, as a submission holds it from its hold
    to its commit: a hold whose run is about to commit is never taken for an orphan.
    Nothing else would ever give these back (invariant 3).
    """
    report = SweepReport("release_orphan_holds")
    grace_ms = deps.settings.orphan_hold_grace_sec * 1000
    now_ms = int(time.time() * 1000)
    with deps.db.transaction() as session:
        tenant_ids = list(session.execute(select(orm.Tenant.id)).scalars())
    candidates: dict[str, list[str]] = {}
    # One pipelined count for every tenant, then the holds of those that have any:
    # a sweep costs the tenants with holds, not every tenant (one round trip each).
    holding = [t for t, (_, holds) in deps.budget.mirror_summaries(tenant_ids).items() if holds]
    for tenant_id in holding:
        old = [run_id for run_id, _, at in deps.budget.holds(tenant_id) if now_ms - at >= grace_ms]
        if old:
            candidates[tenant_id] = old
    for tenant_id, run_ids in candidates.items():
        with deps.db.transaction() as session:
            fence_tenant(session, tenant_id)
            ids = [uuid.UUID(r) for r in run_ids if is_run_id(r)]
            rows = {
                str(run_id): (money_state, charged)
                for run_id, money_state, charged in session.execute(
                    select(orm.Run.id, orm.Run.money_state, orm.Run.actual_cost_micros).where(orm.Run.id.in_(ids))
                )
            }
            fault_point("orphan_sweep_between_read_and_write", tenant_id)
            for run_id in run_ids:
                state = rows.get(run_id)
                if state is None:
                    released = ledger.unhold(deps, tenant_id, run_id)
                    kind = "orphan"
                elif state[0] == MoneyState.SETTLED.value:
                    released = ledger.resettle_stale_hold(deps, tenant_id, run_id, state[1] or 0)
                    kind = "settled_run"
                else:
                    continue  # in flight (RESERVED) or for a human (AUDIT_REQUIRED)
                report.claimed += 1
                report.actions[run_id] = f"released:{released}" if kind == "orphan" else f"resettled:{released}"
                metrics.HOLDS_REPAIRED.labels(kind).inc()
                log.warning("stale hold given back", extra={"tenant_id": tenant_id, "run_id": run_id,
                                                            "kind": kind, "released": released})
    return report


def restore_mirrors(deps, *, force: bool = False) -> dict:
    """Notice that Redis lost its data and rebuild every tenant's mirror, fenced.

    One GET when nothing happened (the sentinel is there). When it is absent
    (a wipe, a restart without data, a failover to an empty replica) every
    tenant whose balance key is gone is rebuilt from the ledger, idle tenants
    included, within one watch interval plus the rebuilds' time (docs/CHAOS.md).
    `force` checks every tenant's key even when the sentinel is present (a
    cluster node that lost its slots keeps the sentinel of another node).
    """
    lost = deps.budget.mark_mirror(uuid.uuid4().hex)
    if not lost and not force:
        return {"redis_data_lost": False, "restored": []}
    if lost:
        metrics.REDIS_DATA_LOSSES.inc()
    with deps.db.transaction() as session:
        tenant_ids = list(session.execute(select(orm.Tenant.id).order_by(orm.Tenant.id)).scalars())
    restored = ledger.rebuild_many(deps, deps.budget.missing_mirrors(tenant_ids))
    metrics.MIRRORS_RESTORED.labels("redis_data_lost" if lost else "missing").inc(len(restored))
    if lost:
        log.warning("redis lost its data: %d tenant budget mirrors rebuilt from the ledger", len(restored),
                    extra={"restored": len(restored), "tenants": len(tenant_ids)})
    return {"redis_data_lost": lost, "restored": restored}


def purge_expired_results(deps) -> SweepReport:
    """Delete stored results past the plan's retention (the run keeps its 410)."""
    report = SweepReport("purge_expired_results")
    with deps.db.transaction() as session:
        stmt = expired_results_query(deps.settings.reaper_scan_limit)
        rows = list(session.execute(stmt.with_for_update(skip_locked=True)).scalars())
        for row in rows:
            deps.results.delete(row.result_key)  # idempotent: deleting a missing key is fine
            report.actions[str(row.id)] = "purged"
            row.result_key = None
        report.claimed = len(rows)
    return report


def audit_budgets(deps, full: bool = False) -> dict:
    """Invariants 1-3 for every tenant; any violation is a CRITICAL alert.

    A tenant whose Redis mirror is *missing* (Redis restarted without its data)
    is rebuilt from the ledger first: that is a known loss with one right
    answer, not a contradiction. A mirror that is present and wrong is only
    reported — somebody must find out why before anything rewrites it.
    """
    restored = restore_mirrors(deps, force=True)["restored"]
    # `full`: every transfer and every run, past the checkpoints. The checkpointed
    # audit reads only runs with a transfer since, or not settled: a run whose row
    # went wrong without a transfer is found by the full one (beat, daily).
    result = audit(deps, full=full)
    for violation in result.violations:
        log.critical("budget audit violation: %s", violation,
                     extra={"alert_channel": ALERT_CHANNEL, "violation": violation})
        metrics.AUDIT_REQUIRED.labels("budget_drift").inc()
    frozen = []
    for tenant_id in sorted(result.drifting):
        # Drift nobody can explain yet: the tenant takes no new money in until an
        # engineer has looked (`dpp tenant unfreeze`); its runs in flight settle.
        first = next((v for v in result.violations if v.startswith((f"{tenant_id}:", f"{tenant_id}/"))), "drift")
        with deps.db.transaction() as session:
            if admissions.freeze_tenant(session, tenant_id, f"audit: {first}"):
                frozen.append(tenant_id)
    return {
        "tenants_checked": result.tenants_checked,
        "runs_checked": result.runs_checked,
        "mirrors_restored": restored,
        "ok": result.ok,
        "violations": result.violations,
        "pending": result.pending,
        "frozen": frozen,
    }


def record_queue_depth(deps) -> dict:
    depth = deps.sqs.depth()
    for state, value in depth.items():
        metrics.QUEUE_DEPTH.labels(state).set(value)
    return depth


def reconcile_run(deps, run_id: str, force: bool = False) -> dict:
    """The engineers' task: one run, whatever its state, with a readable report.

    It keeps off a run a worker may be finishing right now (a finalize claim
    younger than RECONCILE_THRESHOLD_MIN, or a PROCESSING run with a live
    lease), as the reconcile_stuck sweep does, and says why in `action`.
    force=True overrides: for an engineer who knows the worker is gone. If it
    is not, the worker's own COMMIT races this one; a contradiction between
    the two is flagged AUDIT_REQUIRED, never settled twice.
    """
    before = _describe(deps, run_id)
    if before is None:
        return {"run_id": run_id, "found": False}
    action, overrode = "nothing-to-do", None
    claimed = before["finalize_stage"] == "CLAIMED" and before["money_state"] != "AUDIT_REQUIRED"
    if claimed or (before["status"] == "PROCESSING" and before["finalize_stage"] == "NONE"):
        refused, overrode = _take_for_reconcile(deps, run_id, force)
        action = refused or reconcile_one(deps, run_id)
    report = {"run_id": run_id, "found": True, "force": force, "before": before, "action": action}
    if overrode:
        report["overrode"] = overrode
        log.warning("reconcile_run forced over a live worker: %s", overrode,
                    extra={"run_id": run_id, "action": action})
    return {**report, "after": _describe(deps, run_id)}


def _take_for_reconcile(deps, run_id: str, force: bool) -> tuple[str | None, str | None]:
    """Judge and claim one run in one transaction, by the database's clock.

    Returns (None, why it would have been refused, if forced) when the run is
    now this reconcile's to end, or (the action to report, None) when it is not.
    """
    threshold = timedelta(minutes=deps.settings.reconcile_threshold_min)
    with deps.db.transaction() as session:
        row = session.execute(
            select(orm.Run).where(orm.Run.id == uuid.UUID(run_id)).with_for_update(skip_locked=True)
        ).scalar_one_or_none()
        if row is None:
            return "busy: another transaction holds the run (its worker or a sweep is settling it); try again", None
        now, snap = utcnow(session), snapshot(row)
        if snap.money_state is MoneyState.AUDIT_REQUIRED:
            return "audit-required", None
        why = machine.reconcile_refusal(snap, now=now, threshold=threshold)
        if why and not force:
            return f"refused: {why}; pass force=true to override", None
        try:
            if snap.finalize_stage is FinalizeStage.CLAIMED:
                changes = machine.take_over_claim(snap, now=now)
            else:
                changes = machine.claim_expired(snap, now=now, force=force)
        except InvalidTransition as exc:
            return f"changed: {exc}", None
        if not RunRepository(session).apply(snap, changes):
            return "changed: the run moved while it was judged", None
    return None, why


def audit_tenant(deps, tenant_id: str) -> dict:
    result = audit(deps, [tenant_id])
    for violation in result.violations:
        log.critical("tenant audit violation: %s", violation,
                     extra={"alert_channel": ALERT_CHANNEL, "tenant_id": tenant_id, "violation": violation})
    with deps.db.transaction() as session:
        books = ledger.balances(session, tenant_id)
    return {
        "tenant_id": tenant_id,
        "ok": result.ok,
        "runs_checked": result.runs_checked,
        "ledger": {"funded": books.funded, "available": books.available, "held": books.held, "spent": books.spent},
        "redis_available": deps.budget.available(tenant_id),
        "violations": result.violations,
    }


def _describe(deps, run_id: str) -> dict | None:
    with deps.db.transaction() as session:
        row = RunRepository(session).get(run_id)
        if row is None:
            return None
        now = utcnow(session)
    return {
        "status": row.status,
        "finalize_stage": row.finalize_stage,
        "money_state": row.money_state,
        "reserved_micros": row.reserved_micros,
        "actual_cost_micros": row.actual_cost_micros,
        "error_code": row.error_code,
        "lease_expired": row.lease_expires_at is not None and row.lease_expires_at <= now,
        "redis_receipt": deps.budget.receipt(row.tenant_id, run_id),
        "s3_cost": getattr(deps.results.head(result_key(row.tenant_id, run_id)), "actual_cost_micros", None),
    }


def _snapshot(deps, run_id: str):
    with deps.db.transaction() as session:
        return snapshot(RunRepository(session).get(run_id))


def _db_now():
    # The database's clock judges every deadline, as it stamped them.
    return func.now()
