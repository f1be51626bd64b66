"""`dpp.reconcile_run` / `dpp reconcile` keep off a run a worker is finishing (SPEC §3).

On real PostgreSQL, Redis and S3, with production's patience (a 5 minute
reconcile threshold): a run CLAIMED just now, or PROCESSING under a live lease,
is refused with the reason and nothing moves; force=True acts, and the worker
that was overridden can no longer settle the run a second time.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from dpp import cli
from dpp.adapters.results import result_key
from dpp.bootstrap import Deps
from dpp.domain.errors import LeaseLost
from dpp.domain.runs import RunStatus
from dpp.services import finalize, ledger, sweeps
from tasks import sweeps as sweep_tasks
from tests.conftest import assert_invariants
from tests.integration.test_sweeps import MIN_FEE, leased, row, submitted

RESERVED = 500_000


@pytest.fixture
def patient(clean):
    """The services with production's reconcile threshold of 5 minutes."""
    d = Deps(dataclasses.replace(clean.settings, reconcile_threshold_min=5))
    d.packs = clean.packs
    return d


def held(deps, tenant_id: str) -> int:
    with deps.db.transaction() as session:
        return ledger.balances(session, tenant_id).held


def assert_untouched(deps, tenant_id: str, run_id: str, stage: str) -> None:
    r = row(deps, run_id)
    assert (r.status, r.finalize_stage, r.money_state) == ("PROCESSING", stage, "RESERVED")
    assert held(deps, tenant_id) == RESERVED
    assert deps.budget.reservation(tenant_id, run_id) == RESERVED and deps.budget.receipt(tenant_id, run_id) is None


def test_a_finalize_claimed_just_now_is_refused_and_force_rolls_it_back(patient, tenant):
    tenant_id, key = tenant
    (run_id,) = submitted(patient, key)
    finalize.claim(patient, run_id, leased(patient, run_id))  # a worker is finishing it right now

    report = sweeps.reconcile_run(patient, run_id)
    assert report["action"].startswith("refused: claim is ")
    assert report["action"].endswith(" s old, younger than the 300 s threshold; pass force=true to override")
    assert_untouched(patient, tenant_id, run_id, "CLAIMED")
    assert_invariants(patient, [tenant_id], check_redis=False)  # the run is in flight

    forced = sweeps.reconcile_run(patient, run_id, force=True)
    assert forced["action"] == f"rolled_back:{MIN_FEE}" and forced["overrode"].startswith("claim is ")
    assert (forced["after"]["status"], forced["after"]["money_state"]) == ("FAILED", "SETTLED")

    # The overridden worker finishes anyway: its COMMIT finds the run settled and moves nothing.
    patient.results.put(result_key(tenant_id, run_id), b"{}", 7_000)
    late = finalize.commit(patient, run_id, RunStatus.COMPLETED, 7_000, result_key=result_key(tenant_id, run_id))
    assert (late.settled, late.charge_micros) == (False, MIN_FEE)
    assert row(patient, run_id).actual_cost_micros == MIN_FEE
    assert_invariants(patient, [tenant_id])


def test_a_claim_older_than_the_threshold_is_reconciled_without_force(patient, tenant):
    tenant_id, key = tenant
    (run_id,) = submitted(patient, key)
    finalize.claim(patient, run_id, leased(patient, run_id))
    with patient.db.transaction() as s:  # the worker died 6 minutes ago, by the database's clock
        s.execute(text("UPDATE runs SET finalize_claimed_at = now() - interval '6 minutes' WHERE id = :id"),
                  {"id": run_id})
    assert sweeps.reconcile_run(patient, run_id)["action"] == f"rolled_back:{MIN_FEE}"
    assert_invariants(patient, [tenant_id])


def test_a_processing_run_with_a_live_lease_is_refused_and_force_takes_it(patient, tenant):
    tenant_id, key = tenant
    (run_id,) = submitted(patient, key)
    token = leased(patient, run_id)

    report = sweeps.reconcile_run(patient, run_id)
    assert report["action"].startswith("refused: lease is live for another ")
    assert report["action"].endswith(" s (a worker holds it); pass force=true to override")
    assert_untouched(patient, tenant_id, run_id, "NONE")

    forced = sweeps.reconcile_run(patient, run_id, force=True)
    assert forced["action"] == f"rolled_back:{MIN_FEE}"
    with pytest.raises(LeaseLost):  # the overridden worker can no longer finalize
        finalize.claim(patient, run_id, token)
    assert_invariants(patient, [tenant_id])


def test_the_celery_task_takes_force_as_a_json_boolean_only(patient, tenant, monkeypatch):
    tenant_id, key = tenant
    (run_id,) = submitted(patient, key)
    finalize.claim(patient, run_id, leased(patient, run_id))
    monkeypatch.setattr(sweep_tasks, "deps", lambda: patient)

    assert sweep_tasks.reconcile_run.run(run_id)["action"].startswith("refused:")
    with pytest.raises(TypeError, match="JSON boolean"):  # "false" would be truthy
        sweep_tasks.reconcile_run.run(run_id, force="false")
    assert_untouched(patient, tenant_id, run_id, "CLAIMED")
    assert sweep_tasks.reconcile_run.run(run_id, force=True)["action"] == f"rolled_back:{MIN_FEE}"
    assert_invariants(patient, [tenant_id])


def test_cli_reconcile_prints_the_report_and_exits_1_when_refused(patient, tenant, monkeypatch):
    tenant_id, key = tenant
    (run_id,) = submitted(patient, key)
    finalize.claim(patient, run_id, leased(patient, run_id))
    monkeypatch.setattr(cli, "deps", lambda: patient)

    refused = CliRunner().invoke(cli.main, ["reconcile", run_id])
    assert refused.exit_code == 1
    assert json.loads(refused.stdout)["action"].startswith("refused: claim is ")
    assert_untouched(patient, tenant_id, run_id, "CLAIMED")

    forced = CliRunner().invoke(cli.main, ["reconcile", run_id, "--force"])
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["action"] == f"rolled_back:{MIN_FEE}"
    unknown = CliRunner().invoke(cli.main, ["reconcile", "00000000-0000-0000-0000-000000000000"])
    assert unknown.exit_code == 1 and json.loads(unknown.stdout) == {
        "run_id": "00000000-0000-0000-0000-000000000000", "found": False}
    assert_invariants(patient, [tenant_id])
