"""The audit's checkpoints, on real PostgreSQL and Redis (issue 13: audit cost
independent of history).

An audit that found a tenant sound saves the transfer sums up to the last
transfer it saw; the next one sums only the transfers after it and checks only
the runs they touch plus those not settled. That is only correct if a tenant's
transfer ids become visible in id order, which `ledger.post` guarantees by
locking the balance row before it takes an id.
"""
from __future__ import annotations

import threading

from sqlalchemy import select, text

from dpp.adapters import orm
from dpp.adapters.budget import receipt_key
from dpp.domain.ledger import Account, Transfer, TransferKind
from dpp.domain.runs import ErrorCode
from dpp.services import finalize, ledger
from dpp.services.audit import audit
from tests.conftest import assert_invariants, make_tenant
from tests.conftest import submit_decision as submit


def saved(deps, tenant_id: str) -> ledger.Checkpoint:
    with deps.db.transaction() as session:
        return ledger.checkpoint(session, tenant_id)


def last_transfer(deps, tenant_id: str) -> int:
    with deps.db.transaction() as session:
        return session.execute(select(text("max(id)")).select_from(orm.LedgerTransfer)
                               .where(orm.LedgerTransfer.tenant_id == tenant_id)).scalar_one()


def settle_all(deps, run_ids) -> None:
    for run_id in run_ids:
        finalize.fail_unstarted(deps, run_id, ErrorCode.QUEUE_TIMEOUT, "settled by the test")


def audited_tenant(deps, runs: int) -> tuple[str, ledger.Checkpoint]:
    """A tenant with `runs` settled runs, audited once: (tenant_id, its checkpoint)."""
    tenant_id, key = make_tenant(deps)
    settle_all(deps, [submit(deps, key) for _ in range(runs)])
    assert audit(deps, [tenant_id]).ok
    return tenant_id, saved(deps, tenant_id)


def test_a_sound_audit_saves_a_checkpoint_and_the_next_checks_only_what_moved(clean):
    deps = clean
    tenant_id, key = make_tenant(deps)
    settle_all(deps, [submit(deps, key) for _ in range(6)])

    first = audit(deps, [tenant_id])
    assert first.ok, first.violations
    assert first.runs_checked == 6
    cp = saved(deps, tenant_id)
    assert cp.transfer_id == last_transfer(deps, tenant_id)
    with deps.db.transaction() as session:
        assert cp.balances == ledger.balances(session, tenant_id)

    # Two more runs: one settled, one still held. Only those two are read again.
    settle_all(deps, [submit(deps, key)])
    submit(deps, key)
    second = audit(deps, [tenant_id])
    assert second.ok, second.violations
    assert second.runs_checked == 2
    assert saved(deps, tenant_id).transfer_id == last_transfer(deps, tenant_id)

    # Nothing moved: the held run is the only one looked at.
    assert audit(deps, [tenant_id]).runs_checked == 1
    # A full audit still reads everything.
    assert audit(deps, [tenant_id], full=True).runs_checked == 8
    assert_invariants(deps, [tenant_id], check_redis=False)


def test_drift_after_the_checkpoint_is_reported_and_the_checkpoint_stays(clean):
    deps = clean
    tenant_id, before = audited_tenant(deps, runs=3)

    # A transfer written around ledger.post (no balance effect): drift after the checkpoint.
    with deps.db.transaction() as session:
        session.add(orm.LedgerTransfer(tenant_id=tenant_id, kind="ADJUST", debit_account="funding",
                                       credit_account="available", amount_micros=1, memo="drift"))
    report = audit(deps, [tenant_id], check_redis=False)
    assert any("sum of transfers" in v for v in report.violations), report.violations
    assert saved(deps, tenant_id) == before, "an audit that found drift moved the checkpoint"
    # And it keeps being reported: the next audit starts from the same checkpoint.
    assert not audit(deps, [tenant_id], check_redis=False).ok


def test_a_wrong_checkpoint_is_doubted_before_anything_is_called_drift(clean):
    deps = clean
    tenant_id, good = audited_tenant(deps, runs=3)

    # A checkpoint that missed a transfer (what an out-of-order commit would leave).
    with deps.db.transaction() as session:
        session.execute(text("UPDATE ledger_checkpoints SET available_micros = available_micros - 7, "
                             "funding_micros = funding_micros + 7 WHERE tenant_id = :t"), {"t": tenant_id})
    report = audit(deps, [tenant_id])
    assert report.ok, report.violations
    assert saved(deps, tenant_id) == good, "the doubted checkpoint was not replaced by the recomputed one"


def test_a_tenants_transfer_ids_become_visible_in_id_order(clean):
    """The property checkpoints rest on. Eight threads post for one tenant while a
    reader takes snapshots: no snapshot may see an id of the tenant and miss a
    smaller one that commits later (that transfer would fall behind a checkpoint)."""
    deps = clean
    tenant_id, _ = make_tenant(deps, topup_micros=0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def poster(n: int) -> None:
        try:
            for _ in range(40):
                # ledger.post alone, as finalize calls it: no tenant fence around it.
                with deps.db.transaction() as session:
                    ledger.post(session, tenant_id, Transfer(TransferKind.TOPUP, Account.FUNDING, Account.AVAILABLE, 1))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    seen: list[tuple[int, set[int]]] = []

    def reader() -> None:
        while not stop.is_set():
            with deps.db.snapshot() as session:
                ids = set(session.execute(select(orm.LedgerTransfer.id)
                                          .where(orm.LedgerTransfer.tenant_id == tenant_id)).scalars())
            if ids:
                seen.append((max(ids), ids))

    threads = [threading.Thread(target=poster, args=(n,)) for n in range(8)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert not errors, errors
    with deps.db.transaction() as session:
        final = set(session.execute(select(orm.LedgerTransfer.id)
                                    .where(orm.LedgerTransfer.tenant_id == tenant_id)).scalars())
    assert len(final) == 320 and len(seen) > 10
    late = [(top, sorted({i for i in final if i <= top} - ids)) for top, ids in seen
            if {i for i in final if i <= top} - ids]
    assert not late, f"{len(late)} snapshots missed a smaller id that committed later, e.g. {late[0]}"
    assert_invariants(deps, [tenant_id], check_redis=False)  # posted around the mirror on purpose


def test_a_hold_of_a_run_settled_before_the_checkpoint_is_still_recognised(clean):
    """The run is not among those the checkpointed audit reads, but its hold is
    in Redis: the audit reads that run too, and calls it a stale hold of a settled
    run (the orphan sweep's to settle again), not a hold nobody recorded."""
    deps = clean
    tenant_id, key = make_tenant(deps)
    run_id = submit(deps, key)
    settle_all(deps, [run_id])
    assert audit(deps, [tenant_id]).ok
    assert saved(deps, tenant_id).transfer_id == last_transfer(deps, tenant_id)

    # A hold come back (what a rebuild racing the settle once did): no receipt, a hold.
    deps.budget.client.delete(receipt_key(tenant_id, run_id))
    deps.budget.reserve(tenant_id, run_id, 80_000)
    report = audit(deps, [tenant_id])
    assert report.runs_checked == 1
    assert any(f"{run_id}: Redis still holds 80000 for a settled run" in p for p in report.pending), report
    assert report.ok, report.violations
    deps.budget.settle(tenant_id, run_id, 0, reserved_micros=80_000)  # the orphan sweep's job, by hand


def test_a_run_row_gone_wrong_without_a_transfer_is_found_by_the_full_audit(clean):
    """The checkpointed audit reads runs with a transfer since, or not settled; a
    settled run whose row changed without a transfer is the daily full audit's."""
    from dpp.services import sweeps

    tenant_id, _ = audited_tenant(clean, runs=2)
    with clean.db.transaction() as session:
        session.execute(text("UPDATE runs SET reserved_micros = reserved_micros + 1 "
                             "WHERE id = (SELECT id FROM runs WHERE tenant_id = :t LIMIT 1)"), {"t": tenant_id})
    assert audit(clean, [tenant_id]).ok  # not among the runs it reads
    full = sweeps.audit_budgets(clean, full=True)
    assert not full["ok"] and any("RESERVE" in v for v in full["violations"]), full
    assert full["frozen"] == [tenant_id]


def test_tenants_nothing_moved_for_are_confirmed_in_bulk(clean):
    """The audit sweep took ~4 ms for every tenant, idle or not (a snapshot, three
    statements, a Redis script and a version read each). Tenants nothing moved
    for since their checkpoint now cost a few statements all together."""
    from sqlalchemy import event

    deps = clean
    tenants = [make_tenant(deps)[0] for _ in range(30)]
    busy, key = make_tenant(deps)
    submit(deps, key)  # a run holding money: audited alone
    assert audit(deps).ok  # saves their checkpoints
    statements: list[str] = []
    listen = lambda *args: statements.append(args[2])  # noqa: E731 - (conn, cursor, statement, ...)
    event.listen(deps.db.engine, "before_cursor_execute", listen)
    try:
        report = audit(deps)
    finally:
        event.remove(deps.db.engine, "before_cursor_execute", listen)
    assert report.ok, report.violations
    assert report.tenants_checked == len(tenants) + 1 and report.runs_checked == 1
    # The bulk confirmation (a handful) plus the busy tenant's own audit (a handful):
    # not 30 × anything.
    assert len([s for s in statements if "SELECT" in s.upper()]) < 20, statements
    assert_invariants(deps)


def test_a_quiet_tenant_whose_mirror_or_balance_row_went_wrong_is_still_reported(clean):
    deps = clean
    mirror_off, _ = audited_tenant(deps, runs=1)
    row_off, _ = audited_tenant(deps, runs=1)
    young, key = audited_tenant(deps, runs=1)
    # Redis moved with no ledger transfer; the balance row moved with no transfer;
    # a hold nobody recorded yet (a submission between its hold and its commit).
    deps.budget.client.incrby(f"budget:{{{mirror_off}}}:balance_usd_micros", 5)
    with deps.db.transaction() as session:
        session.execute(text("UPDATE tenant_balances SET available_micros = available_micros + 5, "
                             "funding_micros = funding_micros - 5 WHERE tenant_id = :t"), {"t": row_off})
    deps.budget.reserve(young, "00000000-0000-4000-8000-000000000001", 1_000)

    report = audit(deps, [mirror_off, row_off, young])
    assert any(v.startswith(f"{mirror_off}: redis available") for v in report.violations), report.violations
    assert any(v.startswith(f"{row_off}: balance row") for v in report.violations), report.violations
    assert report.drifting == {mirror_off, row_off}
    assert any(p.startswith(f"{young}/") for p in report.pending), report.pending
    # Put right by hand, as an engineer would after looking.
    deps.budget.client.incrby(f"budget:{{{mirror_off}}}:balance_usd_micros", -5)
    with deps.db.transaction() as session:
        session.execute(text("UPDATE tenant_balances SET available_micros = available_micros - 5, "
                             "funding_micros = funding_micros + 5 WHERE tenant_id = :t"), {"t": row_off})
    deps.budget.release(young, "00000000-0000-4000-8000-000000000001")
    assert_invariants(deps, [mirror_off, row_off, young])
