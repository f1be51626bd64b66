"""Admissions: whether new submissions are taken (issue 14; the pilot's kill switch).

Two holds, both rows in PostgreSQL (`admission_holds`), so they survive restarts
and every API process sees the same answer on the submission's own transaction:

- the platform **paused** by an operator (`dpp admissions pause --reason …`), for an
  incident or maintenance: POST /v1/runs answers 503 everywhere;
- a tenant **frozen** automatically when its money raises an alarm it cannot explain:
  a run marked AUDIT_REQUIRED (finalize, reconcile) or drift found by the audit sweep.
  Only that tenant's new submissions are refused, until `dpp tenant unfreeze`.

Either way, runs in flight finish and settle, GETs and replays are answered, and the
sweeps go on. Every change is logged with its operator and reason (the audit trail).
"""
from __future__ import annotations

import logging

from dpp import metrics
from dpp.adapters.repository import PLATFORM, AdmissionRepository, tenant_scope
from dpp.domain.errors import AdmissionsClosed
from dpp.logs import ALERT_CHANNEL

log = logging.getLogger(__name__)

SYSTEM = "dpp"  # the operator recorded for an automatic freeze


def check(session, tenant_id: str) -> None:
    """Raise AdmissionsClosed if the platform is paused or the tenant frozen (one indexed read)."""
    hold = AdmissionRepository(session).holding(tenant_id)
    if hold is not None:
        raise AdmissionsClosed(hold.scope, hold.kind)


def pause(deps, *, reason: str, operator: str) -> bool:
    """Pause the platform's admissions; False if already paused (the first reason stays)."""
    with deps.db.transaction() as session:
        made = AdmissionRepository(session).close(PLATFORM, "pause", reason, operator)
    log.warning("admissions paused" if made else "admissions already paused",
                extra={"reason": reason, "operator": operator})
    return made


def resume(deps, *, reason: str, operator: str) -> bool:
    """Take submissions again; False if they were not paused."""
    with deps.db.transaction() as session:
        released = AdmissionRepository(session).reopen(PLATFORM)
    if released is not None:
        log.warning("admissions resumed", extra={"reason": reason, "operator": operator,
                                                 "paused_for": released.reason, "paused_by": released.operator})
    return released is not None


def freeze_tenant(session, tenant_id: str, reason: str, operator: str = SYSTEM) -> bool:
    """Freeze a tenant's admissions, in the caller's transaction (the one that found
    the alarm, so the two commit together). True if this froze it; a CRITICAL alert."""
    made = AdmissionRepository(session).close(tenant_scope(tenant_id), "freeze", reason[:2000], operator)
    if made:
        log.critical("tenant admissions frozen: %s", reason, extra={
            "tenant_id": tenant_id, "alert_channel": ALERT_CHANNEL, "reason": reason, "operator": operator})
        metrics.TENANT_FREEZES.inc()
    return made


def unfreeze_tenant(deps, tenant_id: str, *, reason: str, operator: str) -> bool:
    with deps.db.transaction() as session:
        released = AdmissionRepository(session).reopen(tenant_scope(tenant_id))
    if released is not None:
        log.warning("tenant admissions unfrozen", extra={
            "tenant_id": tenant_id, "reason": reason, "operator": operator, "frozen_for": released.reason})
    return released is not None


def closed(deps) -> list[dict]:
    """Every hold in force, for /readyz, `dpp admissions status` and the gauges."""
    with deps.db.transaction() as session:
        rows = AdmissionRepository(session).all()
    found = [{"scope": r.scope, "kind": r.kind, "reason": r.reason, "operator": r.operator,
              "since": r.created_at.isoformat()} for r in rows]
    metrics.ADMISSIONS_PAUSED.set(1 if any(h["scope"] == PLATFORM for h in found) else 0)
    metrics.TENANTS_FROZEN.set(sum(h["kind"] == "freeze" for h in found))
    return found
