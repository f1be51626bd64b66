"""Queries over runs, tenants, keys and plans. SQL lives here, rules do not.

`RunRepository.apply` is the compare-and-set that makes the state machine's
checks atomic: it writes only if the row still has the version that was judged.
"""
from __future__ import annotations

import uuid
from datetime import date, datetime, timezone
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from dpp.adapters import orm
from dpp.domain.runs import Changes, FinalizeStage, MoneyState, RunSnapshot, RunStatus


def snapshot(row: orm.Run) -> RunSnapshot:
    return RunSnapshot(
        run_id=str(row.id),
        version=row.version,
        status=RunStatus(row.status),
        finalize_stage=FinalizeStage(row.finalize_stage),
        money_state=MoneyState(row.money_state),
        lease_token=str(row.lease_token) if row.lease_token else None,
        lease_expires_at=row.lease_expires_at,
        reserved_micros=row.reserved_micros,
        minimum_fee_micros=row.minimum_fee_micros,
        enqueue_attempts=row.enqueue_attempts or 1,
        finalize_claimed_at=row.finalize_claimed_at,
    )


def _column_value(value: Any) -> Any:
    if hasattr(value, "value"):  # enums are stored as their text
        return value.value
    return value


class RunRepository:
    def __init__(self, session: Session):
        self.session = session

    def add(self, run: orm.Run) -> None:
        self.session.add(run)
        self.session.flush()

    def get(self, run_id: str, *, for_update: bool = False) -> orm.Run | None:
        try:
            key = uuid.UUID(str(run_id))
        except ValueError:
            return None
        stmt = select(orm.Run).where(orm.Run.id == key)
        if for_update:
            stmt = stmt.with_for_update()
        return self.session.execute(stmt).scalar_one_or_none()

    def get_with_now(self, run_id: str, *, for_update: bool = False) -> tuple[orm.Run | None, datetime]:
        """The run and the database's clock (see `utcnow`) in one round trip."""
        try:
            key = uuid.UUID(str(run_id))
        except ValueError:
            return None, utcnow(self.session)
        stmt = select(orm.Run, func.now()).where(orm.Run.id == key)
        if for_update:
            stmt = stmt.with_for_update(of=orm.Run)
        found = self.session.execute(stmt).one_or_none()
        return (found[0], found[1]) if found is not None else (None, utcnow(self.session))

    def get_for_tenant(self, tenant_id: str, run_id: str) -> orm.Run | None:
        return _owned(self.get(run_id), tenant_id)

    def get_for_tenant_with_now(self, tenant_id: str, run_id: str) -> tuple[orm.Run | None, datetime]:
        run, now = self.get_with_now(run_id)
        return _owned(run, tenant_id), now

    def by_idempotency_key(self, tenant_id: str, key: str) -> orm.Run | None:
        return self.session.execute(
            select(orm.Run).where(orm.Run.tenant_id == tenant_id, orm.Run.idempotency_key == key)
        ).scalar_one_or_none()

    def apply(self, snap: RunSnapshot, changes: Changes) -> bool:
        """Write `changes` iff the run is still at `snap.version`; True when it was written."""
        values = {k: _column_value(v) for k, v in changes.items()}
        values["version"] = orm.Run.version + 1
        values["updated_at"] = func.now()
        result = self.session.execute(
            update(orm.Run)
            .where(orm.Run.id == uuid.UUID(snap.run_id), orm.Run.version == snap.version)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return result.rowcount == 1

    def set_progress(self, run_id: str, lease_token: str, progress: float) -> None:
        # Progress is informational: it does not bump the version, so it never
        # makes a lease claim or finalize lose its compare-and-set.
        self.session.execute(
            update(orm.Run)
            .where(
                orm.Run.id == uuid.UUID(run_id),
                orm.Run.lease_token == uuid.UUID(lease_token),
                orm.Run.status == RunStatus.PROCESSING.value,
            )
            .values(progress=progress)
        )


class TenantRepository:
    def __init__(self, session: Session):
        self.session = session

    def get(self, tenant_id: str) -> orm.Tenant | None:
        return self.session.get(orm.Tenant, tenant_id)

    def plan(self, plan_id: str) -> orm.Plan | None:
        return self.session.get(orm.Plan, plan_id)

    def retention_days(self, tenant_id: str) -> int:
        return self.session.execute(
            select(orm.Plan.retention_days).join(orm.Tenant, orm.Tenant.plan_id == orm.Plan.id)
            .where(orm.Tenant.id == tenant_id)
        ).scalar_one()

    def credentials(self, key_hash: str) -> tuple[orm.ApiKey, orm.Tenant, orm.Plan] | None:
        """The key with its tenant and plan, in one round trip (every request asks)."""
        row = self.session.execute(
            select(orm.ApiKey, orm.Tenant, orm.Plan)
            .join(orm.Tenant, orm.Tenant.id == orm.ApiKey.tenant_id)
            .join(orm.Plan, orm.Plan.id == orm.Tenant.plan_id)
            .where(orm.ApiKey.key_hash == key_hash)
        ).one_or_none()
        return None if row is None else tuple(row)

    def key_by_hash(self, key_hash: str) -> orm.ApiKey | None:
        return self.session.execute(
            select(orm.ApiKey).where(orm.ApiKey.key_hash == key_hash)
        ).scalar_one_or_none()

    def keys(self, tenant_id: str) -> list[orm.ApiKey]:
        return list(self.session.execute(
            select(orm.ApiKey).where(orm.ApiKey.tenant_id == tenant_id).order_by(orm.ApiKey.id)
        ).scalars())

    def active_keys_by_prefix(self, prefix: str) -> list[orm.ApiKey]:
        return list(self.session.execute(
            select(orm.ApiKey).where(orm.ApiKey.display_prefix.startswith(prefix, autoescape=True),
                                     orm.ApiKey.revoked_at.is_(None)).order_by(orm.ApiKey.id)
        ).scalars())

    def upsert_plan(self, **values: Any) -> None:
        stmt = insert(orm.Plan).values(**values)
        self.session.execute(
            stmt.on_conflict_do_update(
                index_elements=[orm.Plan.id],
                set_={k: stmt.excluded[k] for k in values if k != "id"},
            )
        )


def usage_day(at: datetime) -> date:
    """The UTC day of a moment (SPEC §4: usage days are UTC). The database's
    `now()` comes back in the session's time zone, whatever the server's
    TimeZone is: its `.date()` alone would be that zone's day."""
    return at.astimezone(timezone.utc).date()


def record_usage(
    session: Session, tenant_id: str, at: datetime, *, completed: bool, charged: int, released: int
) -> None:
    """Daily usage counters, written in the same transaction as the settlement."""
    stmt = insert(orm.UsageDaily).values(
        tenant_id=tenant_id,
        day=usage_day(at),
        runs_completed=1 if completed else 0,
        runs_failed=0 if completed else 1,
        charged_micros=charged,
        released_micros=released,
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=[orm.UsageDaily.tenant_id, orm.UsageDaily.day],
            set_={
                "runs_completed": orm.UsageDaily.runs_completed + stmt.excluded.runs_completed,
                "runs_failed": orm.UsageDaily.runs_failed + stmt.excluded.runs_failed,
                "charged_micros": orm.UsageDaily.charged_micros + stmt.excluded.charged_micros,
                "released_micros": orm.UsageDaily.released_micros + stmt.excluded.released_micros,
            },
        )
    )


def fence_tenant(session: Session, tenant_id: str) -> None:
    """Take the tenant's money fence until the transaction ends.

    A submission holds it from before its Redis hold until its run row and
    RESERVE commit; a mirror rebuild and the orphan-hold sweep hold it while they
    read the ledger and write Redis. So a rebuild never reads a ledger that
    cannot yet see a hold Redis already made (R1), and the orphan sweep never
    mistakes a hold whose run is about to commit for an orphan. Re-entrant
    within one transaction.
    """
    session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:t, 0))"), {"t": tenant_id})


def fence_tenants(session: Session, tenant_ids: list[str]) -> None:
    """`fence_tenant` for several tenants in one statement, in the order of their lock
    keys: two callers fencing overlapping sets (or ids whose keys collide) never
    wait on each other in a cycle, and a submission holds only one."""
    session.execute(text(
        "SELECT pg_advisory_xact_lock(k) FROM (SELECT DISTINCT hashtextextended(t, 0) AS k "
        "FROM unnest(CAST(:ids AS text[])) AS t ORDER BY 1) AS keys"), {"ids": list(tenant_ids)})


def _owned(run: orm.Run | None, tenant_id: str) -> orm.Run | None:
    # Another tenant's run is indistinguishable from a missing one (SPEC §4: 404).
    return run if run is not None and run.tenant_id == tenant_id else None


def utcnow(session: Session) -> datetime:
    """The database's clock: leases are judged by one clock, not by each worker's."""
    return session.execute(select(func.now())).scalar_one()


PLATFORM = "platform"


def tenant_scope(tenant_id: str) -> str:
    return f"tenant:{tenant_id}"


class AdmissionRepository:
    def __init__(self, session: Session):
        self.session = session

    def holding(self, tenant_id: str) -> orm.AdmissionHold | None:
        """The hold that refuses this tenant's submissions, the platform's first."""
        rows = self.session.execute(
            select(orm.AdmissionHold).where(orm.AdmissionHold.scope.in_((PLATFORM, tenant_scope(tenant_id))))
        ).scalars().all()
        return min(rows, key=lambda r: r.scope != PLATFORM, default=None)

    def get(self, scope: str) -> orm.AdmissionHold | None:
        return self.session.get(orm.AdmissionHold, scope)

    def all(self) -> list[orm.AdmissionHold]:
        return list(self.session.execute(select(orm.AdmissionHold).order_by(orm.AdmissionHold.scope)).scalars())

    def close(self, scope: str, kind: str, reason: str, operator: str) -> bool:
        """True if this closed the scope (False: it was closed already, kept as it was)."""
        stmt = insert(orm.AdmissionHold).values(scope=scope, kind=kind, reason=reason, operator=operator)
        return self.session.execute(stmt.on_conflict_do_nothing(index_elements=["scope"])).rowcount == 1

    def reopen(self, scope: str) -> orm.AdmissionHold | None:
        row = self.get(scope)
        if row is not None:
            self.session.delete(row)
            self.session.flush()
        return row
