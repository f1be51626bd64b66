"""Check the money invariants of SPEC §2 and report every violation found.

Used by the tests after every scenario, and by `dpp audit` / the audit sweep.
A violation is reported, never "fixed" here. The one thing it writes is a
checkpoint (`ledger_checkpoints`): the transfer sums up to the last transfer a
sound audit saw. The next audit sums only the transfers after it and checks
only the runs they touch plus the runs not settled, so its cost follows the
traffic since the last audit, not the tenant's history. A checkpoint that
disagrees with the balance row is doubted first (the sums are redone from the
first transfer) before anything is called drift; `full=True` (`dpp audit
--full`) ignores checkpoints altogether.

Each tenant is read in one REPEATABLE READ snapshot of the ledger, and its
Redis mirror in one script; the pair is judged only if the ledger did not move
while Redis was read (the balance row's version is the same after the Redis
read as in the snapshot), else read again. So the audit never compares figures
of two moments, and it can judge invariant 3 while runs are in flight: every
Redis hold is accounted for — a run the ledger holds, a submission not yet
recorded (young), an orphan, or a hold of a run the ledger already settled —
and so is every settlement Redis made before the ledger did (its receipt).

A tenant nothing has moved for since its checkpoint (no transfer after it, no
run holding money) is confirmed in bulk: one statement for all of them, one
pipelined read of their mirrors, and one of their balance rows' versions after
it. Only a tenant whose mirror shows no hold and exactly the ledger's available
is passed so; anything else is audited alone, as above. So an audit costs
what moved, not how many tenants there are (4 ms per idle tenant before).

`pending` lists what is expected to mend itself within a documented bound (a
mirror Redis lost and the watcher has not rebuilt yet, an orphan hold younger
than the sweep's grace, a tenant too busy to pair a snapshot with): not drift.
With `quiescent=True` (tests, the chaos judge, after the bound) nothing may be
pending: each of those is a violation.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from sqlalchemy import func, select

from dpp.adapters import orm
from dpp.domain.runs import is_run_id
from dpp.services import ledger

READ_ATTEMPTS = 5
QUIET_BATCH = 1000  # tenants per bulk confirmation: one statement, one pipeline


@dataclass
class AuditReport:
    tenants_checked: int = 0
    runs_checked: int = 0
    violations: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    # Tenants with a violation other than a run already marked AUDIT_REQUIRED.
    drifting: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.violations


def audit(deps, tenant_ids: list[str] | None = None, *, check_redis: bool = True,
          quiescent: bool = False, full: bool = False) -> AuditReport:
    """`full` sums every transfer and checks every run again, ignoring checkpoints."""
    report = AuditReport()
    if tenant_ids is None:
        with deps.db.transaction() as session:
            tenant_ids = list(session.execute(select(orm.Tenant.id).order_by(orm.Tenant.id)).scalars())
    quiet = set() if full else _quiet(deps, tenant_ids, check_redis)
    for tenant_id in tenant_ids:
        report.tenants_checked += 1
        if tenant_id in quiet:
            continue
        before = len(report.violations)
        _tenant(deps, tenant_id, report, check_redis, full)
        if any(not _flagged(v) for v in report.violations[before:]):
            report.drifting.add(tenant_id)
    if quiescent:  # after the bound nothing may still be on its way
        report.violations += [f"still pending: {p}" for p in report.pending]
        report.pending = []
    return report


def _quiet(deps, tenant_ids: list[str], check_redis: bool) -> set[str]:
    """The tenants confirmed sound without a snapshot of their own.

    It never reports: a tenant it cannot confirm (a hold, a mirror that differs or
    is absent, a ledger that moved meanwhile) is audited alone, which judges it.
    """
    quiet: set[str] = set()
    for start in range(0, len(tenant_ids), QUIET_BATCH):
        batch = tenant_ids[start:start + QUIET_BATCH]
        with deps.db.snapshot() as session:
            idle = ledger.quiet_since_checkpoint(session, batch)
        if not check_redis:
            quiet |= idle.keys()
            continue
        # Redis after the snapshot, then the versions again: the mirror is paired
        # with a ledger that did not move while it was read (as `_tenant` does).
        mirrors = deps.budget.mirror_summaries(sorted(idle))
        with deps.db.transaction() as session:
            now = ledger.versions(session, sorted(idle))
        quiet |= {t for t, (available, version) in idle.items()
                  if mirrors.get(t) == (available, 0) and now.get(t) == version}
    return quiet


def _tenant(deps, tenant_id: str, report: AuditReport, check_redis: bool, full: bool) -> None:
    for attempt in range(READ_ATTEMPTS):
        found = AuditReport()
        with deps.db.snapshot() as session:
            version = ledger.version(session, tenant_id)
            saved = ledger.Checkpoint() if full else ledger.checkpoint(session, tenant_id)
            cached, since, summed, runs = _ledger(session, tenant_id, saved, found)
            view = None
            if check_redis:
                view = _mirror_read(deps, tenant_id, runs)
                # A hold of a run settled before the checkpoint (a stale hold) is
                # judged like any other: read that run too, in the same snapshot.
                unknown = {m for m in set(view.members) - runs.keys() if is_run_id(m)}
                if unknown:
                    runs.update(_runs(session, tenant_id, found, ids=unknown))
        if view is None or ledger.version_now(deps, tenant_id) == version:
            break
        time.sleep(0.01 * (attempt + 1))  # the ledger moved while Redis was read: pair again
    else:
        view = None
        found.pending.append(f"{tenant_id}: the ledger moved during each of {READ_ATTEMPTS} reads; "
                             "invariant 3 not judged this time")
    # A run already marked AUDIT_REQUIRED stays a violation until a person settles
    # it, but it froze its tenant when marked and, unsettled, is read by every
    # audit anyway: it neither blocks the checkpoint nor counts as new drift.
    sound = not any(not _flagged(v) for v in found.violations)
    if sound and (since != saved or summed.transfer_id > since.transfer_id or full):
        # Sound up to here: the next audit starts from this point (an audit from
        # zero replaces whatever checkpoint there was).
        ledger.save_checkpoint(deps, tenant_id, summed, replace=not since.transfer_id)
    report.runs_checked += found.runs_checked
    report.violations += found.violations
    report.pending += found.pending
    if view is not None:
        _judge_mirror(deps, tenant_id, cached, runs, view, report)


def _ledger(session, tenant_id: str, since: ledger.Checkpoint, report: AuditReport):
    """Invariants 1 and 2 on what moved since the checkpoint, and on every run not settled.

    Returns the checkpoint it started from (the empty one if the saved one was doubted)."""
    cached = ledger.balances(session, tenant_id)
    summed = ledger.balances_from_transfers(session, tenant_id, since)
    if cached != summed.balances and since.transfer_id:
        # Before calling it drift, doubt the checkpoint (a transfer committed out
        # of id order, e.g. by a process older than that rule): start from zero.
        since = ledger.Checkpoint()
        summed = ledger.balances_from_transfers(session, tenant_id, since)
    # Invariant 1, on both the cached row and the sum of transfers.
    for problem in cached.violations():
        report.violations.append(f"{tenant_id}: balance row: {problem}")
    if cached != summed.balances:
        report.violations.append(f"{tenant_id}: balance row {cached} != sum of transfers {summed.balances}")
    if since.transfer_id:
        moved = (select(orm.LedgerTransfer.run_id)
                 .where(orm.LedgerTransfer.tenant_id == tenant_id, orm.LedgerTransfer.id > since.transfer_id,
                        orm.LedgerTransfer.run_id.is_not(None)))
        unsettled = select(orm.Run.id).where(orm.Run.tenant_id == tenant_id, orm.Run.money_state != "SETTLED")
        runs = _runs(session, tenant_id, report, ids=moved.union(unsettled))
    else:
        runs = _runs(session, tenant_id, report)
    return cached, since, summed, runs


def _runs(session, tenant_id: str, report: AuditReport, ids=None) -> dict:
    """Invariant 2, per run (all the tenant's, or those of `ids`): one RESERVE of the
    amount reserved; once terminal, one CHARGE and one RELEASE, nothing left held."""
    stmt = (
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
    )
    if isinstance(ids, set):
        stmt = stmt.where(orm.Run.id.in_([uuid.UUID(i) for i in ids]))
    elif ids is not None:
        # Driven by the few ids, each run found by its key: an IN (subquery) let
        # the planner scan all the tenant's runs, a cost that grew with history.
        wanted = ids.subquery()
        stmt = stmt.join(wanted, wanted.c[0] == orm.Run.id)
    runs: dict = {}
    for run_id, status, reserved, money_state, kind, count, amount in session.execute(stmt).all():
        entry = runs.setdefault(str(run_id), {"status": status, "reserved": reserved, "money": money_state, "kinds": {}})
        if kind is not None:
            entry["kinds"][kind] = (count, int(amount))
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
        if r["money"] == "AUDIT_REQUIRED":
            report.violations.append(f"{tenant_id}/{run_id}: AUDIT_REQUIRED")
    return runs


def _flagged(violation: str) -> bool:
    """A run marked AUDIT_REQUIRED: known, alerted, waiting for a person."""
    return violation.endswith(": AUDIT_REQUIRED")


def _mirror_read(deps, tenant_id: str, runs: dict):
    held = {run_id for run_id, r in runs.items() if r["money"] != "SETTLED"}
    for _ in range(READ_ATTEMPTS):
        candidates = sorted(held | set(deps.budget.hold_ids(tenant_id)))
        view = deps.budget.audit_read(tenant_id, candidates)
        if set(view.members) <= set(candidates):
            return view
    return deps.budget.audit_read(tenant_id, sorted(held | set(view.members)))


def _judge_mirror(deps, tenant_id: str, cached, runs: dict, view, report: AuditReport) -> None:
    """Invariant 3, with every hold and every early Redis settlement accounted for."""
    if view.balance_micros is None:
        report.pending.append(f"{tenant_id}: redis mirror absent (Redis lost its data); restore pending")
        return
    expected = cached.available
    now_ms = int(time.time() * 1000)
    grace_ms = deps.settings.orphan_hold_grace_sec * 1000
    for run_id in view.members:
        amount, reserved_at, _ = view.detail.get(run_id, (None, None, None))
        run = runs.get(run_id)
        if amount is None:
            report.violations.append(f"{tenant_id}/{run_id}: in the holds set with no hold")
            continue
        if run is None:
            # Made by a submission whose run is not recorded (yet): not in the ledger's available.
            expected -= amount
            age_ms = now_ms - (reserved_at or now_ms)
            what = f"{tenant_id}/{run_id}: Redis holds {amount} for a run the ledger does not know ({age_ms // 1000} s old)"
            if age_ms > 2 * grace_ms + 60_000:
                report.violations.append(what + ", past the orphan sweep's grace")
            else:
                report.pending.append(what)
        elif run["money"] == "SETTLED":
            release = run["kinds"].get("RELEASE", (0, 0))[1]
            expected -= release
            report.pending.append(f"{tenant_id}/{run_id}: Redis still holds {amount} for a settled run")
    for run_id, r in runs.items():
        if r["money"] == "SETTLED" or run_id in view.members:
            continue
        _, _, released = view.detail.get(run_id, (None, None, None))
        if released is not None:
            expected += released  # Redis settled first; the ledger's COMMIT is on its way
        else:
            report.violations.append(f"{tenant_id}/{run_id}: the ledger holds {r['reserved']} "
                                     "and Redis has neither its hold nor its receipt")
    if view.balance_micros != expected:
        accounted = "" if expected == cached.available else f" ({expected} expected with holds and receipts accounted)"
        report.violations.append(
            f"{tenant_id}: redis available {view.balance_micros} != ledger available {cached.available}{accounted}"
        )

