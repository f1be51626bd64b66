"""COMMIT finding Redis already settled the run at another price (SPEC §2 invariant 5).

`finalize.commit` settles in Redis first; the settle script is idempotent and
returns the first receipt. If that receipt charged something else than this
settlement wants, there are two stories about one run's money: the run must be
marked AUDIT_REQUIRED, alerted and counted, and nothing else may move.
"""
from __future__ import annotations

import logging

from sqlalchemy import text

from dpp import metrics
from dpp.adapters.results import result_key
from dpp.domain.runs import RunStatus
from dpp.services import finalize, ledger
from dpp.services.audit import audit
from tests.integration.test_sweeps import fast, leased, row, submitted  # noqa: F401 (fixture)

REDIS_PRICE, COMMIT_PRICE = 6_000, 7_000


def test_a_commit_at_another_price_than_the_redis_receipt_is_flagged_and_moves_nothing(fast, tenant, caplog):
    tenant_id, key = tenant
    (run_id,) = submitted(fast, key)
    finalize.claim(fast, run_id, leased(fast, run_id))
    fast.budget.settle(tenant_id, run_id, REDIS_PRICE)  # an earlier settlement of this run, at its price

    def books():
        with fast.db.transaction() as s:
            b = ledger.balances(s, tenant_id)
            kinds = sorted(s.execute(text("SELECT kind FROM ledger_transfers WHERE run_id = :id"),
                                     {"id": run_id}).scalars())
        return (b.funded, b.available, b.held, b.spent), kinds, fast.budget.available(tenant_id), \
            fast.budget.receipt(tenant_id, run_id)

    before = books()
    flagged = metrics.AUDIT_REQUIRED.labels("run")._value.get()

    with caplog.at_level(logging.CRITICAL, logger="dpp.services.finalize"):
        outcome = finalize.commit(fast, run_id, RunStatus.COMPLETED, COMMIT_PRICE,
                                  result_key=result_key(tenant_id, run_id))

    assert (outcome.status, outcome.charge_micros, outcome.settled) == ("AUDIT_REQUIRED", REDIS_PRICE, False)
    r = row(fast, run_id)
    assert (r.money_state, r.status, r.finalize_stage, r.actual_cost_micros) == (
        "AUDIT_REQUIRED", "PROCESSING", "CLAIMED", None)
    critical = [rec for rec in caplog.records if rec.levelno == logging.CRITICAL]
    (alert,) = [rec for rec in critical if rec.getMessage().startswith("AUDIT_REQUIRED")]
    # ...and the tenant is frozen with it (issue 14), a CRITICAL alert of its own.
    assert [rec.tenant_id for rec in critical if rec.getMessage().startswith("tenant admissions frozen")] == [tenant_id]
    assert alert.alert_channel == finalize.ALERT_CHANNEL and alert.run_id == run_id
    assert f"redis receipt charged {REDIS_PRICE}, this settlement wanted {COMMIT_PRICE}" in alert.getMessage()
    assert metrics.AUDIT_REQUIRED.labels("run")._value.get() == flagged + 1

    # Nothing else moved: no CHARGE or RELEASE, the ledger still holds the reservation,
    # Redis keeps its first receipt and balance.
    after = books()
    assert after == before
    assert after[1] == ["RESERVE"] and after[0][2] == 500_000

    # The invariants' check sees exactly this run, for a human; nothing else is off.
    assert audit(fast, [tenant_id]).violations == [f"{tenant_id}/{run_id}: AUDIT_REQUIRED"]
