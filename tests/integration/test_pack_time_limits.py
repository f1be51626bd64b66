"""A pack past its time limit ends FAILED PACK_TIMEOUT at the minimum fee (issue 14, item 4).

The worker enforces each pack's limit as Celery's soft_time_limit: the pool process
gets a signal whose handler raises into the pack, wherever it is. Here a SIGALRM
handler does the same to the service, in this process; tests/e2e/test_pack_time_limits.py
drives the real worker.
"""
from __future__ import annotations

import signal

from dpp.adapters.queue import CeleryQueue
from dpp.domain.packs.base import DEFAULT_TIME_LIMIT_SEC, HARD_LIMIT_GRACE_SEC, time_limits
from dpp.services import execute, tenants
from dpp.services.submit import Submission, submit_run
from tests.conftest import assert_invariants, make_plan, make_tenant
from tests.support.packs import BoomPack, HangPack


class OverTime(Exception):
    """Stands for celery.exceptions.SoftTimeLimitExceeded."""


def test_a_pack_past_its_time_limit_fails_pack_timeout_at_the_minimum_fee(clean):
    make_plan(clean, "test-hang", allowed_pack_types=["decision", "hang"])
    tenant_id, key = make_tenant(clean, "test-hang")
    principal = tenants.authenticate(clean, key)
    run = submit_run(clean, principal, "hang-1", Submission("hang", {}, 50_000, ""), "t").run

    def overtime(signum, frame):
        raise OverTime
    previous = signal.signal(signal.SIGALRM, overtime)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        outcome = execute.execute_run(clean, str(run.id), timed_out=(OverTime,))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    fee = min(principal.minimum_fee_micros, 50_000)
    assert outcome == f"failed:{fee}"
    from dpp.services.runs_query import get_run

    view = get_run(clean, tenant_id, str(run.id))
    assert view["status"] == "FAILED" and view["error"]["code"] == "PACK_TIMEOUT", view
    assert "2 s" in view["error"]["message"]
    assert_invariants(clean, [tenant_id])


def test_each_message_carries_its_packs_limits():
    sent = []

    class App:
        def send_task(self, name, **options):
            sent.append(options)

    CeleryQueue(App()).enqueue_run("r1", "t", time_limits(HangPack()))
    CeleryQueue(App()).enqueue_run("r2", "t")
    assert (sent[0]["soft_time_limit"], sent[0]["time_limit"]) == (2.0, 2.0 + HARD_LIMIT_GRACE_SEC)
    assert "soft_time_limit" not in sent[1]  # the task's defaults
    assert time_limits(BoomPack()) == (DEFAULT_TIME_LIMIT_SEC, DEFAULT_TIME_LIMIT_SEC + HARD_LIMIT_GRACE_SEC)
