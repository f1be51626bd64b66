"""The Lua scripts' contract, on the real Redis (SPEC §2)."""
import pytest

from dpp.adapters.budget import AlreadySettled, BudgetMissing, balance_key, receipt_key, reserve_key


@pytest.fixture
def budget(clean):
    b = clean.budget
    b.restore("acme", 1_000, {})
    return b


def test_every_key_of_a_script_shares_the_tenant_hash_tag():
    for key in (balance_key("acme"), reserve_key("acme", "r1"), receipt_key("acme", "r1")):
        assert "{acme}" in key
        assert key.index("{") == key.index("{acme}")  # the first braces are the tag


def test_reserve_moves_available_into_a_hold(budget):
    out = budget.reserve("acme", "r1", 300)
    assert out.ok and out.balance_micros == 700
    assert budget.available("acme") == 700 and budget.reservation("acme", "r1") == 300


def test_reserve_fails_atomically_when_available_is_short(budget):
    out = budget.reserve("acme", "r1", 1_001)
    assert not out.ok and out.balance_micros == 1_000
    assert budget.available("acme") == 1_000 and budget.reservation("acme", "r1") is None


def test_reserving_the_same_run_twice_holds_once(budget):
    budget.reserve("acme", "r1", 300)
    again = budget.reserve("acme", "r1", 300)
    assert again.ok and budget.available("acme") == 700


def test_settle_charges_part_and_releases_the_rest_once(budget):
    budget.reserve("acme", "r1", 300)
    first = budget.settle("acme", "r1", 120)
    assert (first.charge_micros, first.release_micros, first.replayed) == (120, 180, False)
    assert budget.available("acme") == 880
    second = budget.settle("acme", "r1", 999)
    assert (second.charge_micros, second.release_micros, second.replayed) == (120, 180, True)
    assert second.settled_at_ms == first.settled_at_ms
    assert budget.available("acme") == 880


def test_settle_caps_the_charge_at_the_hold(budget):
    budget.reserve("acme", "r1", 300)
    assert budget.settle("acme", "r1", 10_000).charge_micros == 300
    assert budget.available("acme") == 700


def test_a_settled_run_cannot_reserve_again(budget):
    budget.reserve("acme", "r1", 300)
    budget.settle("acme", "r1", 0)
    with pytest.raises(AlreadySettled):
        budget.reserve("acme", "r1", 300)
    assert budget.available("acme") == 1_000


def test_settle_without_a_hold_says_so_and_moves_nothing(budget):
    receipt = budget.settle("acme", "ghost", 50)
    assert receipt.reservation_missing and budget.available("acme") == 1_000


def test_release_gives_a_whole_hold_back_once(budget):
    budget.reserve("acme", "r1", 300)
    assert budget.release("acme", "r1") == 300
    assert budget.release("acme", "r1") == 0
    assert budget.available("acme") == 1_000


def test_reserve_reports_a_missing_budget_instead_of_inventing_one(clean):
    with pytest.raises(BudgetMissing):
        clean.budget.reserve("nobody", "r1", 1)
    assert clean.budget.available("nobody") is None


def test_credit_increments_and_never_invents_a_missing_balance(clean):
    b = clean.budget
    assert b.credit("acme", 500) is None and b.available("acme") is None  # the caller rebuilds
    b.restore("acme", 500, {})
    assert b.credit("acme", 200) == 700
    b.client.delete(balance_key("acme"))
    assert b.credit("acme", 100) is None and b.available("acme") is None


def test_debit_decrements_and_never_invents_a_missing_balance(clean):
    b = clean.budget
    assert b.debit("acme", 500) is None and b.available("acme") is None  # rebuilt from the ledger later
    b.restore("acme", 500, {})
    assert b.debit("acme", 200) == 300
    assert b.debit("acme", 400) == -100  # the ledger already moved it: mirrored exactly
    assert not b.reserve("acme", "r1", 1).ok  # and nothing can be held while it is below zero


def test_restore_puts_holds_back_but_not_one_redis_already_settled(budget):
    """finalize settles Redis first, then the ledger: a rebuild in between must not
    resurrect the settled hold, and must count the release Redis already gave."""
    assert budget.reserve("acme", "settled", 300).ok and budget.reserve("acme", "live", 200).ok
    budget.settle("acme", "settled", 120)                     # release 180, ledger not yet
    budget.restore("acme", 500, {"settled": 300, "live": 200})  # the ledger still holds both
    assert budget.available("acme") == 500 + 180
    assert budget.reservation("acme", "settled") is None and budget.reservation("acme", "live") == 200
    assert [h[0] for h in budget.holds("acme")] == ["live"]
    assert budget.settle("acme", "settled", 120).replayed   # the ledger catches up; Redis moves nothing
    assert budget.available("acme") == 680


def test_scripts_reload_after_a_script_flush(budget):
    budget.client.script_flush()
    assert budget.reserve("acme", "r1", 1).ok


def test_settle_of_a_lost_hold_writes_its_receipt_and_releases_into_a_present_balance(budget):
    """A present balance was set by a restore that counted the run as held, so the
    release is due; the receipt stops a later rebuild from resurrecting the hold."""
    receipt = budget.settle("acme", "lost", 120, 300)
    assert receipt.reservation_missing and (receipt.charge_micros, receipt.release_micros) == (120, 180)
    assert budget.available("acme") == 1_180
    assert budget.receipt("acme", "lost")["release"] == 180
    assert budget.settle("acme", "lost", 120, 300).replayed and budget.available("acme") == 1_180


def test_settle_of_a_lost_hold_on_a_wiped_balance_invents_no_balance(clean):
    b = clean.budget
    receipt = b.settle("wiped", "lost", 120, 300)
    assert receipt.reservation_missing and b.available("wiped") is None
    b.restore("wiped", 1_000, {"lost": 300})       # the ledger still holds it: the receipt's release counts
    assert b.available("wiped") == 1_180 and b.holds("wiped") == []


def test_restore_drops_holds_the_ledger_does_not_know(budget):
    assert budget.reserve("acme", "orphan", 200).ok and budget.reserve("acme", "live", 100).ok
    assert budget.restore("acme", 900, {"live": 100}) == 900
    assert [h[0] for h in budget.holds("acme")] == ["live"] and budget.reservation("acme", "orphan") is None
