"""A submission whose COMMIT outcome is unknown keeps its Redis hold (review of issue 14).

`bound_waits` makes "PostgreSQL went silent during COMMIT" an OperationalError the
API sees, while the server may have committed. Giving the hold back then would let
Redis hand the same money out again if the run is in the ledger: the hold is left
to the orphan sweep, which judges it under the tenant's fence.
"""
from __future__ import annotations

import dataclasses
import uuid
from contextlib import contextmanager

import psycopg2
import pytest
from sqlalchemy.exc import OperationalError

from dpp.bootstrap import Deps
from dpp.domain.errors import DependencyUnavailable
from dpp.domain.runs import ErrorCode
from dpp.services import finalize, ledger, sweeps, tenants
from dpp.services.submit import Submission, submit_run
from tests.conftest import assert_invariants, make_tenant
from tests.support.inputs import DECISION

CAP = 80_000


def _commit_then_lose_the_answer(deps, monkeypatch):
    real = deps.db.transaction

    @contextmanager
    def transaction():
        with real() as session:
            yield session
        raise OperationalError("COMMIT", {}, psycopg2.OperationalError("PostgreSQL did not answer within 5 s"))

    monkeypatch.setattr(deps.db, "transaction", transaction)


def test_a_commit_that_went_through_keeps_its_hold_and_the_books_agree(clean, monkeypatch):
    tenant_id, key = make_tenant(clean)
    who = tenants.authenticate(clean, key)
    funded = clean.budget.available(tenant_id)
    _commit_then_lose_the_answer(clean, monkeypatch)
    with pytest.raises(DependencyUnavailable):
        submit_run(clean, who, "lost-answer", Submission("decision", DECISION, CAP, ""), "t")
    monkeypatch.undo()

    # The run is in the ledger with its RESERVE, and Redis still holds it: they agree.
    replay = submit_run(clean, who, "lost-answer", Submission("decision", DECISION, CAP, ""), "t")
    assert replay.replayed
    assert clean.budget.available(tenant_id) == funded - CAP == ledger.available(clean, tenant_id)
    assert_invariants(clean, [tenant_id])
    # Never published: the stale-queued sweep re-drives it, or ends it at 0; either way it settles once.
    finalize.fail_unstarted(clean, str(replay.run.id), ErrorCode.QUEUE_TIMEOUT, "test")
    assert clean.budget.available(tenant_id) == funded == ledger.available(clean, tenant_id)
    assert_invariants(clean, [tenant_id])


def test_a_commit_that_did_not_go_through_leaves_a_hold_the_orphan_sweep_gives_back(clean, monkeypatch):
    tenant_id, key = make_tenant(clean)
    who = tenants.authenticate(clean, key)
    funded = clean.budget.available(tenant_id)
    real = clean.db.transaction

    @contextmanager
    def transaction():
        with real() as session:
            try:
                yield session
            finally:
                session.rollback()  # the server never committed it
        raise OperationalError("COMMIT", {}, psycopg2.OperationalError("server closed the connection"))

    monkeypatch.setattr(clean.db, "transaction", transaction)
    with pytest.raises(DependencyUnavailable):
        submit_run(clean, who, uuid.uuid4().hex, Submission("decision", DECISION, CAP, ""), "t")
    monkeypatch.undo()
    assert clean.budget.available(tenant_id) == funded - CAP  # held, the ledger knows no run
    assert ledger.available(clean, tenant_id) == funded

    eager = Deps(dataclasses.replace(clean.settings, orphan_hold_grace_sec=0))
    eager.packs = clean.packs
    sweeps.release_orphan_holds(eager)
    assert clean.budget.available(tenant_id) == funded
    assert_invariants(clean, [tenant_id])
