"""Beat's sweeps and the engineers' tasks (SPEC §3). Each returns its report.

All are idempotent and safe to run concurrently with themselves, so an
engineer may trigger one by hand while beat runs it too:
    celery -A dpp call dpp.reconcile_run --args='["<run_id>"]'
    celery -A dpp call dpp.reconcile_run --args='["<run_id>"]' --kwargs='{"force": true}'
"""
import json
import logging

from dpp.bootstrap import deps
from dpp.celery import app
from dpp.services import sweeps

log = logging.getLogger(__name__)


def _reported(name: str, report: dict) -> dict:
    # Printed in the worker log as well, for engineers without a result backend.
    log.info("%s report:\n%s", name, json.dumps(report, indent=2, default=str), extra={"report": report})
    return report


@app.task(name="dpp.sweep_expired_leases")
def sweep_expired_leases() -> dict:
    return sweeps.sweep_expired_leases(deps()).as_dict()


@app.task(name="dpp.reconcile_stuck")
def reconcile_stuck() -> dict:
    return sweeps.reconcile_stuck(deps()).as_dict()


@app.task(name="dpp.sweep_stale_queued")
def sweep_stale_queued() -> dict:
    return sweeps.sweep_stale_queued(deps()).as_dict()


@app.task(name="dpp.release_orphan_holds")
def release_orphan_holds() -> dict:
    return sweeps.release_orphan_holds(deps()).as_dict()


@app.task(name="dpp.purge_expired_results")
def purge_expired_results() -> dict:
    return sweeps.purge_expired_results(deps()).as_dict()


@app.task(name="dpp.audit_budgets")
def audit_budgets() -> dict:
    return sweeps.audit_budgets(deps())


@app.task(name="dpp.audit_full")
def audit_full() -> dict:
    return sweeps.audit_budgets(deps(), full=True)


@app.task(name="dpp.record_queue_depth")
def record_queue_depth() -> dict:
    return sweeps.record_queue_depth(deps())


@app.task(name="dpp.sweep_broker")
def sweep_broker() -> dict:
    """Idle broadcast queues (dead Flower, crashed worker) and their SNS subscriptions."""
    from dpp import metrics
    from dpp.adapters.kombu_sqs import sweep_broker as sweep

    report = sweep(app)
    metrics.BROKER_SWEEP.inc(len(report["deleted_queues"]))
    return report


@app.task(name="dpp.reconcile_run", ignore_result=False)
def reconcile_run(run_id: str, force: bool = False) -> dict:
    """Refuses a run a worker may still be finishing unless force is the JSON boolean true."""
    if not isinstance(force, bool):
        # "false" as a string is truthy: guessing here could roll back a live run.
        raise TypeError(f"force must be a JSON boolean (--kwargs='{{\"force\": true}}'), not {force!r}")
    return _reported("dpp.reconcile_run", sweeps.reconcile_run(deps(), run_id, force=force))


@app.task(name="dpp.audit_tenant", ignore_result=False)
def audit_tenant(tenant_id: str) -> dict:
    return _reported("dpp.audit_tenant", sweeps.audit_tenant(deps(), tenant_id))
