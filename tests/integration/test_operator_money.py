"""An operator's money on real PostgreSQL and Redis: top-ups and adjustments by reference.

The scenario that made references necessary: `dpp budget topup` committed the
ledger, then failed because Redis was down, and the operator's natural retry
credited a second time. Now the ledger commit is the answer, a retry with the
same reference is a replay, and the mirror is repaired from the ledger.
"""
from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from dpp import cli
from dpp.adapters import orm
from dpp.bootstrap import Deps
from dpp.domain.errors import InsufficientBudget, ReferenceConflict
from dpp.services import ledger
from tests.conftest import assert_invariants, make_tenant
from tests.support.services import private_redis

FUNDED = 10_000_000  # what `tenant` starts with


def transfers(deps, tenant_id: str) -> list[tuple[str, int, str | None, str | None]]:
    """(kind, signed effect on available, reference, memo) of each operator transfer, oldest first."""
    with deps.db.transaction() as session:
        rows = session.execute(
            select(orm.LedgerTransfer)
            .where(orm.LedgerTransfer.tenant_id == tenant_id, orm.LedgerTransfer.run_id.is_(None))
            .order_by(orm.LedgerTransfer.id)
        ).scalars().all()
        return [
            (r.kind, r.amount_micros if r.credit_account == "available" else -r.amount_micros, r.reference, r.memo)
            for r in rows
        ]


def books(deps, tenant_id: str):
    with deps.db.transaction() as session:
        return ledger.balances(session, tenant_id)


# ----------------------------------------------------------------------------- top-up


def test_a_topup_with_redis_down_is_credited_once_and_its_retry_is_a_replay(clean, settings, tmp_path, caplog):
    with private_redis(tmp_path) as redis_srv:
        d = Deps(dataclasses.replace(settings, redis_url=redis_srv.url))
        tenant_id, _ = make_tenant(d, topup_micros=0)
        ledger.topup(d, tenant_id, FUNDED, reference="pay-0")
        assert d.budget.available(tenant_id) == FUNDED

        redis_srv.stop()
        with caplog.at_level(logging.WARNING, logger="dpp.services.ledger"):
            first = ledger.topup(d, tenant_id, 5_000_000, reference="pay-1")
        # The ledger commit is the truth: no error, the money is credited, the mirror lags.
        assert (first.replayed, first.mirror, first.books.available) == (False, "unavailable", 15_000_000)
        assert any("redis mirror was not updated" in r.getMessage() for r in caplog.records)

        redis_srv.start()  # back, empty (--save ""): the operator retries, as anyone would
        retry = ledger.topup(d, tenant_id, 5_000_000, reference="pay-1")
        assert (retry.replayed, retry.mirror, retry.books.available) == (True, "untouched", 15_000_000)
        assert retry.posted_at == first.posted_at

        assert [t[:3] for t in transfers(d, tenant_id)] == [
            ("TOPUP", FUNDED, "pay-0"), ("TOPUP", 5_000_000, "pay-1")]
        assert books(d, tenant_id).funded == 15_000_000  # credited exactly once
        ledger.rebuild(d, tenant_id)
        assert d.budget.available(tenant_id) == 15_000_000
        assert_invariants(d, [tenant_id])


def test_the_same_reference_with_another_amount_is_refused_and_moves_nothing(clean, tenant):
    tenant_id, _ = tenant
    d = clean
    ledger.topup(d, tenant_id, 2_000_000, reference="inv-7")
    with pytest.raises(ReferenceConflict) as refused:
        ledger.topup(d, tenant_id, 3_000_000, reference="inv-7")
    assert (refused.value.posted_micros, refused.value.requested_micros) == (2_000_000, 3_000_000)
    assert books(d, tenant_id).available == FUNDED + 2_000_000
    assert d.budget.available(tenant_id) == FUNDED + 2_000_000
    assert len([t for t in transfers(d, tenant_id) if t[2] == "inv-7"]) == 1
    assert_invariants(d, [tenant_id])


def test_concurrent_retries_of_one_reference_credit_once(clean, tenant):
    tenant_id, _ = tenant
    d = clean
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: ledger.topup(d, tenant_id, 1_000_000, reference="pay-x"), range(8)))
    assert sorted(o.replayed for o in outcomes) == [False] + [True] * 7
    assert books(d, tenant_id).available == d.budget.available(tenant_id) == FUNDED + 1_000_000
    assert_invariants(d, [tenant_id])


def test_a_topup_without_a_reference_still_works_for_scripts(clean, tenant):
    tenant_id, _ = tenant
    d = clean
    posted = ledger.topup(d, tenant_id, 1_000)
    assert (posted.replayed, posted.mirror, posted.reference) == (False, "moved", None)
    assert d.budget.available(tenant_id) == FUNDED + 1_000
    assert_invariants(d, [tenant_id])


# ----------------------------------------------------------------------------- adjust


def test_adjustments_move_available_both_ways_once_per_reference(clean, tenant, caplog):
    tenant_id, _ = tenant
    d = clean
    with caplog.at_level(logging.WARNING, logger="dpp.services.ledger"):
        up = ledger.adjust(d, tenant_id, 1_500_000, reason="goodwill for incident 42", reference="adj-1", operator="alice")
    assert (up.replayed, up.books.available, d.budget.available(tenant_id)) == (False, 11_500_000, 11_500_000)
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING and "adjustment" in r.getMessage())
    assert (warning.operator, warning.reason, warning.reference) == ("alice", "goodwill for incident 42", "adj-1")

    again = ledger.adjust(d, tenant_id, 1_500_000, reason="goodwill for incident 42", reference="adj-1", operator="alice")
    assert again.replayed and d.budget.available(tenant_id) == 11_500_000
    with pytest.raises(ReferenceConflict):  # the same reference the other way round is a mistake
        ledger.adjust(d, tenant_id, -1_500_000, reason="oops", reference="adj-1", operator="alice")

    down = ledger.adjust(d, tenant_id, -4_000_000, reason="refunded by card", reference="adj-2", operator="bob")
    assert (down.books.available, d.budget.available(tenant_id)) == (7_500_000, 7_500_000)
    assert ledger.adjust(d, tenant_id, -4_000_000, reason="refunded by card", reference="adj-2", operator="bob").replayed

    with pytest.raises(InsufficientBudget) as short:  # available 7.50: taking 7.500001 is refused
        ledger.adjust(d, tenant_id, -7_500_001, reason="too much", reference="adj-3", operator="bob")
    assert short.value.available_micros == 7_500_000
    assert (books(d, tenant_id).available, d.budget.available(tenant_id)) == (7_500_000, 7_500_000)

    assert transfers(d, tenant_id)[1:] == [
        ("ADJUST", 1_500_000, "adj-1", "goodwill for incident 42 (by alice)"),
        ("ADJUST", -4_000_000, "adj-2", "refunded by card (by bob)"),
    ]
    assert books(d, tenant_id).funded == FUNDED + 1_500_000 - 4_000_000
    assert_invariants(d, [tenant_id])


def test_a_topup_and_an_adjustment_may_share_a_reference(clean, tenant):
    tenant_id, _ = tenant
    d = clean
    ledger.topup(d, tenant_id, 1_000_000, reference="case-9")
    assert not ledger.adjust(d, tenant_id, -250_000, reason="partial refund", reference="case-9", operator="a").replayed
    assert books(d, tenant_id).available == FUNDED + 750_000
    assert_invariants(d, [tenant_id])


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture
def dpp_cli(clean, monkeypatch):
    """`dpp ...` in-process, on the test's deps; returns the click Result."""
    monkeypatch.setattr(cli, "deps", lambda: clean)

    def invoke(*args: str, env: dict | None = None):
        return CliRunner().invoke(cli.main, list(args), env={"USER": "alice", **(env or {})})

    return invoke


def test_cli_topup_refuses_to_run_without_a_reference(clean, dpp_cli, tenant):
    tenant_id, _ = tenant
    result = dpp_cli("budget", "topup", "--tenant", tenant_id, "--amount", "5.00")
    assert result.exit_code != 0
    assert "--reference is required" in result.stderr and "twice" in result.stderr
    assert books(clean, tenant_id).funded == FUNDED


def test_cli_topup_twice_with_one_reference_credits_once(clean, dpp_cli, tenant):
    tenant_id, _ = tenant
    first = dpp_cli("budget", "topup", "--tenant", tenant_id, "--amount", "5.00", "--reference", "stripe-pi-1")
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("topped up 5.00 (reference stripe-pi-1); available 15.00")
    second = dpp_cli("budget", "topup", "--tenant", tenant_id, "--amount", "5.00", "--reference", "stripe-pi-1")
    assert second.exit_code == 0, second.output
    assert second.stdout.startswith("already credited: reference stripe-pi-1") and "nothing moved" in second.stdout
    other = dpp_cli("budget", "topup", "--tenant", tenant_id, "--amount", "6.00", "--reference", "stripe-pi-1")
    assert other.exit_code != 0 and other.stdout == ""
    assert other.stderr.count("\n") == 1 and "already credited 5.00" in other.stderr and "not 6.00" in other.stderr
    d = clean
    assert books(d, tenant_id).funded == FUNDED + 5_000_000 == d.budget.available(tenant_id)
    assert_invariants(d, [tenant_id])


def test_cli_topup_with_redis_down_exits_0_and_says_how_the_mirror_is_repaired(clean, settings, tmp_path, monkeypatch):
    with private_redis(tmp_path) as redis_srv:
        d = Deps(dataclasses.replace(settings, redis_url=redis_srv.url))
        monkeypatch.setattr(cli, "deps", lambda: d)
        tenant_id, _ = make_tenant(d)
        redis_srv.stop()
        result = CliRunner().invoke(
            cli.main, ["budget", "topup", "--tenant", tenant_id, "--amount", "1.00", "--reference", "r-1"])
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("topped up 1.00")
        assert "warning: the ledger is credited" in result.stderr
        assert f"dpp budget rebuild --tenant {tenant_id}" in result.stderr
        redis_srv.start()
        replay = CliRunner().invoke(
            cli.main, ["budget", "topup", "--tenant", tenant_id, "--amount", "1.00", "--reference", "r-1"])
        assert replay.exit_code == 0 and replay.stdout.startswith("already credited")
        rebuilt = CliRunner().invoke(cli.main, ["budget", "rebuild", "--tenant", tenant_id])
        assert rebuilt.exit_code == 0 and "11.00" in rebuilt.stdout
        assert_invariants(d, [tenant_id])


def test_cli_adjust_is_audited_idempotent_and_refuses_a_negative_available(clean, dpp_cli, tenant):
    tenant_id, _ = tenant
    args = ("budget", "adjust", "--tenant", tenant_id, "--reason", "double-billed in March")
    down = dpp_cli(*args, "--amount", "-2.50", "--reference", "T-1")
    assert down.exit_code == 0, down.output
    assert down.stdout.startswith("adjusted -2.50 (reference T-1, by alice); available 7.50")
    assert dpp_cli(*args, "--amount", "-2.50", "--reference", "T-1").stdout.startswith("already adjusted")
    too_much = dpp_cli(*args, "--amount", "-7.50001", "--reference", "T-2")
    assert too_much.exit_code != 0 and "would make available negative (available 7.50)" in too_much.stderr
    no_ref = dpp_cli(*args, "--amount", "1.00")
    assert no_ref.exit_code != 0 and "--reference is required" in no_ref.stderr
    nobody = dpp_cli(*args, "--amount", "1.00", "--reference", "T-3", env={"USER": ""})
    assert nobody.exit_code != 0 and "--operator" in nobody.stderr
    d = clean
    assert transfers(d, tenant_id)[1:] == [("ADJUST", -2_500_000, "T-1", "double-billed in March (by alice)")]
    assert books(d, tenant_id).available == d.budget.available(tenant_id) == 7_500_000
    assert_invariants(d, [tenant_id])
