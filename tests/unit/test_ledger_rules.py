import pytest

from dpp.domain.ledger import Account, Balances, TransferKind, adjustment, settle, signed_amount, transfer


def test_each_kind_moves_along_its_edge():
    assert transfer(TransferKind.TOPUP, 5).debit is Account.FUNDING
    assert transfer(TransferKind.RESERVE, 5, "r").credit is Account.HELD
    assert transfer(TransferKind.CHARGE, 5, "r").credit is Account.SPENT
    assert transfer(TransferKind.RELEASE, 5, "r").credit is Account.AVAILABLE


def test_negative_or_float_amounts_are_refused():
    with pytest.raises(ValueError):
        transfer(TransferKind.TOPUP, -1)
    with pytest.raises(ValueError):
        transfer(TransferKind.TOPUP, 1.5)


def test_an_adjustment_only_moves_between_funding_and_available():
    up, down = adjustment(700), adjustment(-300)
    assert (up.kind, up.debit, up.credit, up.amount_micros) == (TransferKind.ADJUST, Account.FUNDING, Account.AVAILABLE, 700)
    assert (down.kind, down.debit, down.credit, down.amount_micros) == (TransferKind.ADJUST, Account.AVAILABLE, Account.FUNDING, 300)
    assert (signed_amount(up), signed_amount(down)) == (700, -300)
    books = Balances().apply(transfer(TransferKind.TOPUP, 1_000)).apply(up).apply(down)
    assert (books.funded, books.available, books.violations()) == (1_400, 1_400, [])
    for nothing in (0, 1.5):
        with pytest.raises(ValueError):
            adjustment(nothing)


def test_charge_is_capped_at_the_reservation():
    s = settle(reserved_micros=100, charge_wanted_micros=250)
    assert (s.charge_micros, s.release_micros) == (100, 0)
    s = settle(reserved_micros=100, charge_wanted_micros=30)
    assert (s.charge_micros, s.release_micros) == (30, 70)


def test_a_full_run_keeps_the_books_balanced():
    books = Balances()
    books = books.apply(transfer(TransferKind.TOPUP, 10_000_000))
    books = books.apply(transfer(TransferKind.RESERVE, 500_000, "r"))
    assert books.held == 500_000 and books.violations() == []
    for t in settle(500_000, 7_000).transfers("r"):
        books = books.apply(t)
    assert books == Balances(funding=-10_000_000, available=9_993_000, held=0, spent=7_000)
    assert books.funded == books.available + books.held + books.spent
    assert books.violations() == []


def test_violations_name_the_broken_invariant():
    assert Balances(funding=-10, available=5, held=0, spent=0).violations()
    assert Balances(funding=0, available=-1, held=1, spent=0).violations()
