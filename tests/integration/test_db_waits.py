"""The API's PostgreSQL waits end on the server first (issue 14 review).

`db.bound_waits` bounded the client's wait on a silent socket; a request waiting for
a lock (a tenant's fence held by a stuck transaction) gave up on the client side,
and its backend went on waiting for the lock on the server. The engines an API
process makes now ask the server for lock_timeout and statement_timeout below the
client's bound: the server cancels the wait itself (SQLSTATE 55P03), which is an
outage (503), and no backend is left queued behind the lock.
"""
from __future__ import annotations

import dataclasses
import random
import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from dpp.adapters import db
from dpp.adapters.outages import database_outage
from dpp.adapters.repository import fence_tenant
from dpp.bootstrap import Deps
from tests.conftest import assert_invariants, make_tenant


@pytest.fixture
def bounded(settings):
    """Deps whose engine was made under `bound_waits(2)`, as in a gunicorn worker.

    A URL of its own (an inert libpq option) makes a new engine: engines are cached per URL."""
    db.bound_waits(2.0)
    try:
        yield Deps(dataclasses.replace(settings, database_url=f"{settings.database_url}?keepalives_idle={random.randint(600, 30_000)}"))
    finally:
        db.bound_waits(0)


def test_a_wait_for_a_tenants_fence_is_cancelled_by_the_server_and_leaves_no_backend(clean, bounded):
    tenant_id, _ = make_tenant(clean)
    with clean.db.transaction() as holder:
        fence_tenant(holder, tenant_id)  # a stuck transaction holding the fence
        started = time.monotonic()
        with pytest.raises(OperationalError) as waited:
            with bounded.db.transaction() as session:
                fence_tenant(session, tenant_id)
        elapsed = time.monotonic() - started
        assert getattr(waited.value.orig, "pgcode", None) == "55P03", waited.value  # the server's lock_timeout
        assert database_outage(waited.value) and elapsed < 2.0
        stuck = holder.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            " AND datname = current_database()")).scalar_one()
        assert stuck == 0, "a backend is still queued on the fence after its client gave up"
    assert_invariants(clean, [tenant_id])


def test_engines_made_without_the_bound_ask_the_server_for_nothing(settings):
    plain = Deps(dataclasses.replace(settings, database_url=f"{settings.database_url}?keepalives_idle={random.randint(600, 30_000)}"))
    with plain.db.transaction() as session:
        assert session.execute(text("SHOW lock_timeout")).scalar_one() == "0"
