"""The ledger's rules, with no storage (SPEC §2; TigerBeetle's vocabulary).

Each tenant has four accounts. Money only ever moves as an immutable transfer
between two of them, along the edges below; a balance is the sum of transfers.

    funding --TOPUP--> available --RESERVE--> held --CHARGE--> spent
                           ^                    |
                           +------RELEASE-------+
    ADJUST: an audited correction. The database allows any edge; an operator's
            adjustment (`adjustment` below) only moves funding <-> available.

Funding is a contra account: it goes negative by what was paid in, so the sum
of all four balances is always zero and `funded = available + held + spent`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Account(str, enum.Enum):
    FUNDING = "funding"
    AVAILABLE = "available"
    HELD = "held"
    SPENT = "spent"


class TransferKind(str, enum.Enum):
    TOPUP = "TOPUP"
    RESERVE = "RESERVE"
    CHARGE = "CHARGE"
    RELEASE = "RELEASE"
    ADJUST = "ADJUST"


# (debit = money leaves, credit = money arrives) for each kind with a fixed edge.
EDGES: dict[TransferKind, tuple[Account, Account]] = {
    TransferKind.TOPUP: (Account.FUNDING, Account.AVAILABLE),
    TransferKind.RESERVE: (Account.AVAILABLE, Account.HELD),
    TransferKind.CHARGE: (Account.HELD, Account.SPENT),
    TransferKind.RELEASE: (Account.HELD, Account.AVAILABLE),
}

# Kinds a run may carry; each at most once per run (a database constraint too).
RUN_KINDS = (TransferKind.RESERVE, TransferKind.CHARGE, TransferKind.RELEASE)


@dataclass(frozen=True)
class Transfer:
    kind: TransferKind
    debit: Account
    credit: Account
    amount_micros: int
    run_id: str | None = None


def transfer(kind: TransferKind, amount_micros: int, run_id: str | None = None) -> Transfer:
    if kind not in EDGES:
        raise ValueError(f"{kind} has no fixed edge; build an ADJUST explicitly")
    if not isinstance(amount_micros, int) or amount_micros < 0:
        raise ValueError("a transfer moves a non-negative int of micros")
    debit, credit = EDGES[kind]
    return Transfer(kind, debit, credit, amount_micros, run_id)


def adjustment(amount_micros: int) -> Transfer:
    """An operator's correction of *available*: positive from funding, negative back to it.

    Held and spent money belong to runs and are corrected through them (the
    reconciler), never by hand, so these are the only two edges offered.
    """
    if not isinstance(amount_micros, int) or amount_micros == 0:
        raise ValueError("an adjustment moves a non-zero int of micros")
    if amount_micros > 0:
        return Transfer(TransferKind.ADJUST, Account.FUNDING, Account.AVAILABLE, amount_micros)
    return Transfer(TransferKind.ADJUST, Account.AVAILABLE, Account.FUNDING, -amount_micros)


def signed_amount(t: Transfer) -> int:
    """What a transfer did to *available*, with its sign (the inverse of `adjustment`)."""
    if t.credit is Account.AVAILABLE:
        return t.amount_micros
    if t.debit is Account.AVAILABLE:
        return -t.amount_micros
    return 0


@dataclass(frozen=True)
class Settlement:
    """How a reservation ends: what is charged and what goes back."""

    reserved_micros: int
    charge_micros: int

    @property
    def release_micros(self) -> int:
        return self.reserved_micros - self.charge_micros

    def transfers(self, run_id: str) -> tuple[Transfer, Transfer]:
        return (
            transfer(TransferKind.CHARGE, self.charge_micros, run_id),
            transfer(TransferKind.RELEASE, self.release_micros, run_id),
        )


def settle(reserved_micros: int, charge_wanted_micros: int) -> Settlement:
    """Cap the charge at the reservation: an agent never pays more than its cap."""
    if reserved_micros < 0 or charge_wanted_micros < 0:
        raise ValueError("money is non-negative")
    return Settlement(reserved_micros, min(charge_wanted_micros, reserved_micros))


@dataclass(frozen=True)
class Balances:
    funding: int = 0
    available: int = 0
    held: int = 0
    spent: int = 0

    @property
    def funded(self) -> int:
        return -self.funding

    def apply(self, t: Transfer) -> "Balances":
        values = {a.value: getattr(self, a.value) for a in Account}
        values[t.debit.value] -= t.amount_micros
        values[t.credit.value] += t.amount_micros
        return Balances(**values)

    def violations(self) -> list[str]:
        """Invariant 1 and the sign rules; empty when the books are sound."""
        found = []
        if self.funded != self.available + self.held + self.spent:
            found.append(
                f"funded {self.funded} != available {self.available} + held {self.held} + spent {self.spent}"
            )
        for name in ("available", "held", "spent"):
            if getattr(self, name) < 0:
                found.append(f"{name} is negative: {getattr(self, name)}")
        return found
