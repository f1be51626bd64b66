"""A worker that loses its lease mid-pack, with the heartbeat actually ticking.

SPEC §3 step 2: "If it loses the lease, the pack is stopped and the worker does
not finalize." Here the pack runs for several heartbeat ticks (1 s heartbeat,
3 s lease, a 6 s pack) before another owner takes the lease over, so the
heartbeat is what has to notice, and the pack's own progress shows whether it
was stopped or ran to its end.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid

import pytest
from sqlalchemy import text

from dpp.adapters.repository import RunRepository
from dpp.adapters.results import result_key
from dpp.bootstrap import Deps
from dpp.domain.packs import PackRegistry
from dpp.services import execute, sweeps, tenants
from dpp.services.submit import Submission, submit_run
from tests.conftest import assert_invariants, make_tenant
from tests.support.packs import SlowPack
from tests.support.wait import wait_for

LEASE_SEC, HEARTBEAT_SEC, PACK_SEC = 3, 1, 6
RESERVED, MIN_FEE = 100_000, 5_000  # pro plan
SLACK_SEC = 1.0  # scheduling, a tick's database round trip


class RecordingSlowPack(SlowPack):
    """The test pack, remembering each progress report the worker let through."""

    def __init__(self):
        self.accepted: list[float] = []

    def run(self, inputs, progress):
        def recorded(fraction):
            progress(fraction)  # raises PackStopped once the heartbeat lost the lease
            self.accepted.append(fraction)

        return super().run(inputs, recorded)


@pytest.fixture
def short_leases(clean):
    d = Deps(dataclasses.replace(clean.settings, worker_lease_ttl_sec=LEASE_SEC,
                                 worker_heartbeat_interval_sec=HEARTBEAT_SEC))
    d.packs = PackRegistry([RecordingSlowPack()])
    return d


def run_row(deps, run_id):
    with deps.db.transaction() as session:
        return RunRepository(session).get(run_id)


def transfers(deps, run_id) -> list[str]:
    with deps.db.transaction() as session:
        return sorted(session.execute(text("SELECT kind FROM ledger_transfers WHERE run_id = :id"),
                                      {"id": run_id}).scalars())


def test_a_heartbeat_that_loses_the_lease_mid_pack_stops_the_pack_and_nothing_is_finalized(short_leases, caplog):
    deps = short_leases
    pack = deps.packs.get("slow")
    tenant_id, key = make_tenant(deps)
    who = tenants.authenticate(deps, key)
    run_id = str(submit_run(deps, who, "k", Submission("slow", {"seconds": PACK_SEC}, RESERVED, ""), "t").run.id)

    outcome = {}

    def worker():
        outcome["result"] = execute.execute_run(deps, run_id)
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=worker, name="worker")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="dpp.services.heartbeat"):
        thread.start()
        # The heartbeat keeps the lease: two extensions seen before anyone interferes.
        leases = set()
        wait_for(lambda: leases.add(run_row(deps, run_id).lease_expires_at) or len(leases - {None}) >= 3,
                 HEARTBEAT_SEC * 2 + 3, "two heartbeat ticks to extend the lease")
        assert run_row(deps, run_id).status == "PROCESSING"

        # Another owner takes the run over, as a second worker's claim would.
        thief = str(uuid.uuid4())
        with deps.db.transaction() as session:
            session.execute(text(
                "UPDATE runs SET lease_token = :t, lease_expires_at = now() + make_interval(secs => :ttl), "
                "version = version + 1 WHERE id = :id"), {"t": thief, "ttl": LEASE_SEC, "id": run_id})
        stolen_at, stolen_wall = time.monotonic(), time.time()
        thread.join(timeout=PACK_SEC + 5)
    assert not thread.is_alive()

    # The heartbeat noticed within a tick.
    lost = [r for r in caplog.records if r.name == "dpp.services.heartbeat" and r.getMessage() == "lease lost"]
    assert len(lost) == 1, [r.getMessage() for r in caplog.records]
    assert lost[0].created - stolen_wall <= HEARTBEAT_SEC + SLACK_SEC

    # The pack was stopped at its next progress report, not run to its end.
    assert outcome["result"] == execute.LEASE_LOST
    assert outcome["ended"] - stolen_at <= HEARTBEAT_SEC + SLACK_SEC
    assert outcome["ended"] - started < PACK_SEC - 1
    assert pack.accepted and max(pack.accepted) < 0.8, pack.accepted

    # This worker finalized nothing: no CLAIM, no upload, no settlement anywhere.
    row = run_row(deps, run_id)
    assert (row.status, row.finalize_stage, row.money_state) == ("PROCESSING", "NONE", "RESERVED")
    assert str(row.lease_token) == thief
    assert transfers(deps, run_id) == ["RESERVE"]
    assert deps.results.head(result_key(tenant_id, run_id)) is None
    assert deps.budget.receipt(tenant_id, run_id) is None
    assert deps.budget.reservation(tenant_id, run_id) == RESERVED

    # The new owner never finishes either; its lease runs out and the sweep ends the run once.
    with deps.db.transaction() as session:
        session.execute(text("UPDATE runs SET lease_expires_at = now() - interval '1 second' WHERE id = :id"),
                        {"id": run_id})
    assert sweeps.sweep_expired_leases(deps).actions == {run_id: f"failed:LEASE_EXPIRED:{MIN_FEE}"}
    assert transfers(deps, run_id) == ["CHARGE", "RELEASE", "RESERVE"]
    assert_invariants(deps, [tenant_id])
