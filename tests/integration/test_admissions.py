"""The kill switch (issue 14): a tenant frozen on a money alarm, the platform paused
by hand; on real PostgreSQL and Redis.

Before: nothing in the product acted on AUDIT_REQUIRED or on drift the audit
found; the tenant went on taking money in.
"""
from __future__ import annotations


import pytest
from click.testing import CliRunner

from dpp import cli
from dpp.domain.errors import AdmissionsClosed
from dpp.domain.runs import ErrorCode
from dpp.services import admissions, finalize, sweeps
from tests.conftest import assert_invariants, make_tenant
from tests.conftest import submit_decision as submit


@pytest.fixture
def dpp_cli(clean, monkeypatch):
    monkeypatch.setattr(cli, "deps", lambda: clean)
    return lambda *args: CliRunner().invoke(cli.main, list(args), env={"USER": "alice"})


def test_drift_found_by_the_audit_freezes_that_tenant_only(clean, dpp_cli, caplog):
    drifting, key = make_tenant(clean)
    bystander, other_key = make_tenant(clean)
    in_flight = submit(clean, key, idem="before-the-alarm")
    clean.budget.credit(drifting, 1_234)  # Redis gives money the ledger never did: drift

    with caplog.at_level("CRITICAL", logger="dpp.services.admissions"):
        result = sweeps.audit_budgets(clean)
    assert result["frozen"] == [drifting] and not result["ok"]
    assert any("tenant admissions frozen" in r.getMessage() and r.alert_channel == finalize.ALERT_CHANNEL
               for r in caplog.records)
    with pytest.raises(AdmissionsClosed) as refused:
        submit(clean, key)
    assert refused.value.kind == "freeze"
    assert submit(clean, key, idem="before-the-alarm") == in_flight  # a replay is still answered
    submit(clean, other_key)  # the bystander is not frozen
    # Its run in flight still ends and settles.
    assert finalize.fail_unstarted(clean, in_flight, ErrorCode.QUEUE_TIMEOUT, "test") is not None
    assert sweeps.audit_budgets(clean)["frozen"] == []  # already frozen: no second alert

    status = dpp_cli("admissions", "status")
    assert f"tenant:{drifting}" in status.output and "freeze" in status.output
    clean.budget.debit(drifting, 1_234)  # the engineer found and repaired the mirror
    unfrozen = dpp_cli("tenant", "unfreeze", drifting, "--reason", "mirror repaired, ticket 42")
    assert unfrozen.exit_code == 0, unfrozen.output
    submit(clean, key)
    assert dpp_cli("tenant", "unfreeze", drifting, "--reason", "again").exit_code == 2
    _settle_all(clean)
    assert_invariants(clean, [drifting, bystander])


def test_a_run_marked_audit_required_freezes_its_tenant_in_the_same_transaction(clean):
    tenant_id, key = make_tenant(clean)
    run_id = submit(clean, key)
    finalize.flag_audit_required(clean, run_id, "test: the ledger and S3 disagree")
    with pytest.raises(AdmissionsClosed):
        submit(clean, key)
    held = {h["scope"]: h for h in admissions.closed(clean)}
    assert held[f"tenant:{tenant_id}"]["reason"].startswith(f"run {run_id} AUDIT_REQUIRED")


def test_pause_and_resume_the_platform(clean, dpp_cli):
    tenant_id, key = make_tenant(clean)
    submit(clean, key, idem="earlier")
    paused = dpp_cli("admissions", "pause", "--reason", "database failover at 02:00")
    assert paused.exit_code == 0 and "paused" in paused.output
    assert "already paused" in dpp_cli("admissions", "pause", "--reason", "again").output
    with pytest.raises(AdmissionsClosed) as refused:
        submit(clean, key)
    assert refused.value.kind == "pause"
    submit(clean, key, idem="earlier")  # replays are answered
    assert "database failover" in dpp_cli("admissions", "status").output
    assert dpp_cli("admissions", "resume", "--reason", "failover done").exit_code == 0
    assert dpp_cli("admissions", "resume", "--reason", "twice").exit_code == 2
    submit(clean, key)
    _settle_all(clean)
    assert_invariants(clean, [tenant_id])


def _settle_all(deps) -> None:
    """End every run still QUEUED (no worker in these tests), as the stale-queued sweep would."""
    from sqlalchemy import text

    with deps.db.transaction() as session:
        queued = [str(r) for r in session.execute(text("SELECT id FROM runs WHERE status = 'QUEUED'")).scalars()]
    for run_id in queued:
        finalize.fail_unstarted(deps, run_id, ErrorCode.QUEUE_TIMEOUT, "settled by the test")
