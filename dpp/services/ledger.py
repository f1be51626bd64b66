"""Every movement of money, and nothing else (SPEC §2).

Two books are kept: the PostgreSQL ledger (the truth: immutable transfers plus
a balance row updated in the same transaction) and the Redis gate (a mirror of
*available* that lets submissions reserve without locking PostgreSQL).

The order of writes is chosen so that a crash between any two of them leaves a
state a sweep or `dpp budget rebuild` can resolve, and never money created:

- top-up: ledger first, then Redis. A crash in between leaves Redis *lower*
  than the ledger (an agent sees less than it has), which the audit reports.
- reserve: Redis first (the atomic gate), then the ledger in the same
  transaction as the run row. If that transaction fails the Redis hold is
  released here; a crash in between leaves a Redis-only hold with no run.
- settle: Redis first (idempotent, with a receipt), then the ledger CHARGE and
  RELEASE in the caller's transaction. A crash in between is repaired by
  running the same settle again: Redis replays its receipt, the ledger catches up.
"""
from __future__ import annotations

import logging
import uuid

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from dpp.adapters import orm
from dpp.adapters.budget import BudgetMissing
from dpp.adapters.repository import fence_tenant
from dpp.domain.errors import InsufficientBudget
from dpp.domain.ledger import Account, Balances, Settlement, Transfer, TransferKind, settle, transfer
from dpp.faults import fault_point

log = logging.getLogger(__name__)

_BALANCE_COLUMNS = {
    Account.FUNDING: "funding_micros",
    Account.AVAILABLE: "available_micros",
    Account.HELD: "held_micros",
    Account.SPENT: "spent_micros",
}


def post(session: Session, tenant_id: str, t: Transfer, memo: str | None = None) -> None:
    """The one function that writes money to the ledger: a transfer and its balance effect.

    The balance row's CHECKs (no negative available/held/spent, sum zero) make
    an impossible transfer fail the whole transaction.
    """
    session.add(
        orm.LedgerTransfer(
            tenant_id=tenant_id,
            run_id=uuid.UUID(t.run_id) if t.run_id else None,
            kind=t.kind.value,
            debit_account=t.debit.value,
            credit_account=t.credit.value,
            amount_micros=t.amount_micros,
            memo=memo,
        )
    )
    debit, credit = _BALANCE_COLUMNS[t.debit], _BALANCE_COLUMNS[t.credit]
    table = orm.TenantBalance.__table__
    session.execute(
        update(table)
        .where(table.c.tenant_id == tenant_id)
        .values(
            {
                debit: table.c[debit] - t.amount_micros,
                credit: table.c[credit] + t.amount_micros,
                "updated_at": func.now(),
            }
        )
    )
    session.flush()


def open_accounts(session: Session, tenant_id: str) -> None:
    session.add(orm.TenantBalance(tenant_id=tenant_id))
    session.flush()


def balances(session: Session, tenant_id: str, *, for_update: bool = False) -> Balances:
    stmt = select(orm.TenantBalance).where(orm.TenantBalance.tenant_id == tenant_id)
    if for_update:
        stmt = stmt.with_for_update()
    row = session.execute(stmt).scalar_one()
    return Balances(
        funding=row.funding_micros,
        available=row.available_micros,
        held=row.held_micros,
        spent=row.spent_micros,
    )


def version(session: Session, tenant_id: str) -> str:
    """The balance row's row version (xmin): it changes with every transfer posted."""
    return session.execute(
        select(text("xmin::text")).select_from(orm.TenantBalance).where(orm.TenantBalance.tenant_id == tenant_id)
    ).scalar_one()


def version_now(deps, tenant_id: str) -> str:
    with deps.db.transaction() as session:
        return version(session, tenant_id)


def available(deps, tenant_id: str) -> int:
    """The ledger's available balance, in a transaction of its own."""
    with deps.db.transaction() as session:
        return balances(session, tenant_id).available


def balances_from_transfers(session: Session, tenant_id: str) -> Balances:
    """Recompute the balances from the transfers alone (the audit's second opinion)."""
    result = Balances()
    rows = session.execute(
        select(orm.LedgerTransfer.debit_account, orm.LedgerTransfer.credit_account, func.sum(orm.LedgerTransfer.amount_micros))
        .where(orm.LedgerTransfer.tenant_id == tenant_id)
        .group_by(orm.LedgerTransfer.debit_account, orm.LedgerTransfer.credit_account)
    )
    for debit, credit, amount in rows:
        result = result.apply(
            Transfer(TransferKind.ADJUST, Account(debit), Account(credit), int(amount))
        )
    return result


# --- top-up ---------------------------------------------------------------


def topup(deps, tenant_id: str, amount_micros: int, memo: str | None = None) -> Balances:
    if amount_micros <= 0:
        raise ValueError("a top-up is a positive amount")
    with deps.db.transaction() as session:
        balances(session, tenant_id, for_update=True)  # serialise top-ups per tenant
        post(session, tenant_id, transfer(TransferKind.TOPUP, amount_micros), memo=memo)
        after = balances(session, tenant_id)
    if deps.budget.credit(tenant_id, amount_micros) is None:
        # Redis has no balance for the tenant (new, or wiped): the whole mirror
        # from the ledger, the live holds with it, not just this balance.
        rebuild(deps, tenant_id)
    return after


# --- reserve --------------------------------------------------------------


def hold(deps, session: Session, tenant_id: str, run_id: str, amount_micros: int) -> None:
    """Reserve in Redis (the gate). Raises InsufficientBudget or DependencyUnavailable.

    Call with the tenant's fence held in `session` (the submission's transaction):
    a mirror that must be rebuilt first is rebuilt in that same transaction.
    """
    try:
        outcome = deps.budget.reserve(tenant_id, run_id, amount_micros)
    except BudgetMissing:
        # Redis lost this tenant (restart without data, new node): the ledger knows.
        rebuild(deps, tenant_id, session=session)
        outcome = deps.budget.reserve(tenant_id, run_id, amount_micros)
    if not outcome.ok:
        raise InsufficientBudget(outcome.balance_micros, amount_micros)


def record_reservation(session: Session, tenant_id: str, run_id: str, amount_micros: int) -> None:
    """The ledger side of a hold, in the same transaction as the run row."""
    post(session, tenant_id, transfer(TransferKind.RESERVE, amount_micros, run_id))


def unhold(deps, tenant_id: str, run_id: str) -> int:
    """Give back a Redis hold that never became a recorded run."""
    return deps.budget.release(tenant_id, run_id)


def resettle_stale_hold(deps, tenant_id: str, run_id: str, charged_micros: int) -> int:
    """Give back a Redis hold of a run the ledger has already settled; the release given.

    Such a hold was put back by a rebuild that read the ledger before the run's
    COMMIT (Redis had been wiped after the run's Redis settle). The Redis balance
    set by that rebuild left the whole hold out, so settling it again at the
    ledger's charge gives back exactly the ledger's release. Call under the
    tenant's fence (the orphan sweep does).
    """
    amount = deps.budget.reservation(tenant_id, run_id)
    if amount is None:
        return 0
    return deps.budget.settle(tenant_id, run_id, charged_micros, amount).release_micros


# --- settle ---------------------------------------------------------------


def settle_in_redis(deps, tenant_id: str, run_id: str, reserved_micros: int, charge_wanted_micros: int) -> Settlement:
    """Step 1 of a settlement. Idempotent: a repeat returns the first receipt."""
    wanted = settle(reserved_micros, charge_wanted_micros)
    receipt = deps.budget.settle(tenant_id, run_id, wanted.charge_micros, reserved_micros)
    if receipt.reservation_missing:
        # Redis had lost the hold (wiped). settle.lua still wrote a receipt, so a
        # rebuild before our ledger COMMIT counts this release as available
        # instead of resurrecting a hold that nobody would ever settle (R2).
        log.warning(
            "settle found no reservation in redis; receipt written from the ledger's reservation",
            extra={"tenant_id": tenant_id, "run_id": run_id},
        )
    return Settlement(reserved_micros, receipt.charge_micros)


def record_settlement(session: Session, tenant_id: str, run_id: str, settlement: Settlement) -> None:
    """Step 2: CHARGE and RELEASE in the caller's transaction (with the run's COMMIT)."""
    charge, release = settlement.transfers(run_id)
    post(session, tenant_id, charge)
    post(session, tenant_id, release)


# --- rebuild --------------------------------------------------------------


def rebuild(deps, tenant_id: str, *, session: Session | None = None) -> Balances:
    """Set the tenant's Redis mirror from the ledger: available, and the live holds.

    Fenced: it holds the tenant's fence (`fence_tenant`) from its ledger read to
    its Redis write, and a submission holds the same fence from its Redis hold to
    its ledger commit. So every hold Redis has that the ledger does not show is an
    orphan of a submission that died, and restore.lua drops it; and no hold can
    be made in between the read and the write. Settles are not fenced: a run
    Redis settled while its ledger COMMIT is pending has a receipt, keeps no hold,
    and its release counts as available (restore.lua).

    `session`: the caller's transaction, when it already holds the fence.
    """
    if session is None:
        with deps.db.transaction() as own:
            return rebuild(deps, tenant_id, session=own)
    fence_tenant(session, tenant_id)
    books = balances(session, tenant_id)
    holds = dict(
        session.execute(
            select(orm.Run.id, orm.Run.reserved_micros).where(
                # RESERVED and AUDIT_REQUIRED alike: the ledger still holds their money.
                orm.Run.tenant_id == tenant_id, orm.Run.money_state != "SETTLED"
            )
        ).all()
    )
    fault_point("rebuild_between_read_and_write")
    deps.budget.restore(tenant_id, books.available, {str(k): int(v) for k, v in holds.items()})
    return books
