"""Check the money invariants of SPEC §2 and report every violation found.

Used by the tests after every scenario, and by `dpp audit` / the audit sweep.
It only reads: a violation is reported, never "fixed" here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select

from dpp.adapters import orm
from dpp.services import ledger


@dataclass
class AuditReport:
    tenants_checked: int = 0
    runs_checked: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def audit(deps, tenant_ids: list[str] | None = None, *, check_redis: bool = True) -> AuditReport:
    report = AuditReport()
    with deps.db.transaction() as session:
        ids = tenant_ids or list(session.execute(select(orm.Tenant.id)).scalars())
        for tenant_id in ids:
            report.tenants_checked += 1
            _tenant(session, deps, tenant_id, report, check_redis)
    return report


def _tenant(session, deps, tenant_id: str, report: AuditReport, check_redis: bool) -> None:
    cached = ledger.balances(session, tenant_id)
    summed = ledger.balances_from_transfers(session, tenant_id)
    # Invariant 1, on both the cached row and the sum of transfers.
    for problem in cached.violations():
        report.violations.append(f"{tenant_id}: balance row: {problem}")
    if cached != summed:
        report.violations.append(f"{tenant_id}: balance row {cached} != sum of transfers {summed}")

    # Invariant 2, per terminal run: one CHARGE, one RELEASE, nothing left held.
    per_run = session.execute(
        select(
            orm.Run.id,
            orm.Run.status,
            orm.Run.reserved_micros,
            orm.Run.money_state,
            orm.LedgerTransfer.kind,
            func.count(orm.LedgerTransfer.id),
            func.coalesce(func.sum(orm.LedgerTransfer.amount_micros), 0),
        )
        .outerjoin(orm.LedgerTransfer, orm.LedgerTransfer.run_id == orm.Run.id)
        .where(orm.Run.tenant_id == tenant_id)
        .group_by(orm.Run.id, orm.LedgerTransfer.kind)
    ).all()
    runs: dict = {}
    for run_id, status, reserved, money_state, kind, count, amount in per_run:
        entry = runs.setdefault(run_id, {"status": status, "reserved": reserved, "money": money_state, "kinds": {}})
        if kind is not None:
            entry["kinds"][kind] = (count, int(amount))
    in_flight = 0
    for run_id, r in runs.items():
        report.runs_checked += 1
        kinds = r["kinds"]
        reserve = kinds.get("RESERVE", (0, 0))
        charge = kinds.get("CHARGE", (0, 0))
        release = kinds.get("RELEASE", (0, 0))
        if reserve != (1, r["reserved"]):
            report.violations.append(f"{tenant_id}/{run_id}: RESERVE {reserve} != one of {r['reserved']}")
        if r["status"] in ("COMPLETED", "FAILED"):
            if charge[0] != 1 or release[0] != 1:
                report.violations.append(
                    f"{tenant_id}/{run_id}: terminal with {charge[0]} CHARGE and {release[0]} RELEASE"
                )
            if not 0 <= charge[1] <= r["reserved"]:
                report.violations.append(f"{tenant_id}/{run_id}: charge {charge[1]} outside 0..{r['reserved']}")
            if reserve[1] - charge[1] - release[1] != 0:
                report.violations.append(
                    f"{tenant_id}/{run_id}: still holds {reserve[1] - charge[1] - release[1]} after it ended"
                )
        else:
            in_flight += 1
        if r["money"] == "AUDIT_REQUIRED":
            report.violations.append(f"{tenant_id}/{run_id}: AUDIT_REQUIRED")

    # Invariant 3: only meaningful when nothing is in flight for the tenant —
    # including a submission between its Redis hold and its ledger record,
    # which only the Redis holds set shows.
    if check_redis and in_flight == 0:
        in_flight = sum(1 for run_id, _, _ in deps.budget.holds(tenant_id) if _uuid(run_id) not in runs)
    if check_redis and in_flight == 0:
        mirror = deps.budget.available(tenant_id)
        if mirror != cached.available:
            report.violations.append(
                f"{tenant_id}: redis available {mirror} != ledger available {cached.available}"
            )


def _uuid(value: str):
    import uuid

    try:
        return uuid.UUID(value)
    except ValueError:
        return value
