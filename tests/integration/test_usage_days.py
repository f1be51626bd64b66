"""Usage days are UTC days whatever the database's time zone (SPEC §4, issue 14).

`finalize` dated usage with `now().date()`, where `now()` comes back in the
session's time zone: on a server set to another zone, runs settled near
midnight UTC were counted on the wrong day.
"""
from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime, timezone

from sqlalchemy import func, select

from dpp.adapters import orm
from dpp.bootstrap import Deps
from dpp.domain.runs import ErrorCode
from dpp.services import finalize, tenants
from dpp.services.submit import Submission, submit_run
from tests.conftest import assert_invariants, make_tenant
from tests.support.inputs import DECISION


def test_a_run_settled_under_a_far_time_zone_counts_on_its_utc_day(clean, settings):
    # A zone whose date differs from UTC's right now: UTC+14 late in the UTC day, UTC-12 early.
    zone = "Pacific/Kiritimati" if datetime.now(timezone.utc).hour >= 10 else "Etc/GMT+12"
    far = Deps(dataclasses.replace(settings, database_url=f"{settings.database_url}?options=-ctimezone%3D{zone}"))
    with far.db.transaction() as session:
        local = session.execute(select(func.now())).scalar_one()
    utc_day = datetime.now(timezone.utc).date()
    assert local.date() != utc_day, "the test needs a zone whose day differs from UTC's"

    tenant_id, key = make_tenant(far)
    run = submit_run(far, tenants.authenticate(far, key), uuid.uuid4().hex,
                     Submission("decision", DECISION, 80_000, ""), "usage-day").run
    finalize.fail_unstarted(far, str(run.id), ErrorCode.QUEUE_TIMEOUT, "settled by the test")
    with far.db.transaction() as session:
        days = session.execute(select(orm.UsageDaily.day, orm.UsageDaily.runs_failed)
                               .where(orm.UsageDaily.tenant_id == tenant_id)).all()
    assert days == [(utc_day, 1)], days
    assert_invariants(far, [tenant_id])
