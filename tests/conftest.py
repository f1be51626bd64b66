"""Shared fixtures. Integration and e2e tests need the services `make test` starts.

`make test` (scripts/devstack.py test) exports DATABASE_URL, REDIS_URL,
SQS_*/S3_* for a scratch database `dpp_test`, Redis DB 15, and test queue and
bucket; DPP_TEST=1 marks that environment. Unit tests need none of it.
"""
from __future__ import annotations

import os
import uuid

import pytest


_SPEED = {"unit": 0, "deploy": 0, "integration": 1, "e2e": 2}


def pytest_collection_modifyitems(config, items):
    # Fast to slow: unit, then integration, then e2e (which starts processes).
    items.sort(key=lambda item: next((v for k, v in _SPEED.items() if f"{os.sep}{k}{os.sep}" in str(item.fspath)), 3))
    for item in items:
        path = str(item.fspath)
        if f"{os.sep}integration{os.sep}" in path:
            item.add_marker(pytest.mark.integration)
        if f"{os.sep}e2e{os.sep}" in path:
            item.add_marker(pytest.mark.e2e)


def _require_services():
    if os.environ.get("DPP_TEST") != "1":
        pytest.fail(
            "integration/e2e tests need the services: run them through `make test` "
            "(or `make unit` for the unit tests alone)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def settings():
    _require_services()
    from dpp.config import Settings, reset_settings

    reset_settings()
    return Settings.from_env()


@pytest.fixture(scope="session")
def deps(settings):
    from dpp.bootstrap import Deps

    return Deps(settings)


@pytest.fixture(scope="session")
def seeded(deps):
    from dpp.services.tenants import seed_plans

    for pack in ("tests.support.packs:BoomPack", "tests.support.packs:SlowPack", "tests.support.packs:HangPack"):
        module, _, attr = pack.partition(":")
        deps.packs.register(getattr(__import__(module, fromlist=[attr]), attr)())
    seed_plans(deps, extra_pack_types=("boom", "slow", "hang"))
    return deps


@pytest.fixture
def clean(seeded, settings):
    """An empty ledger, an empty Redis DB and an empty queue for each test."""
    from sqlalchemy import text

    from dpp.adapters.aws import client

    with seeded.db.transaction() as session:
        session.execute(
            text("TRUNCATE ledger_transfers, usage_daily, runs, api_keys, tenant_balances, tenants, admission_holds CASCADE")
        )
    seeded.budget.client.flushdb()
    if settings.sqs_queue_url:
        drain_queue(client(settings, "sqs", settings.sqs_endpoint_url), settings.sqs_queue_url)
    yield seeded


def drain_queue(sqs, queue_url: str) -> int:
    """Delete every visible message. (PurgeQueue is allowed once a minute per queue.)"""
    drained = 0
    while True:
        messages = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0, VisibilityTimeout=0
        ).get("Messages", [])
        if not messages:
            return drained
        sqs.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
        )
        drained += len(messages)


def make_tenant(deps, plan: str = "pro", topup_micros: int = 10_000_000) -> tuple[str, str]:
    """A tenant with a fresh key and a top-up: (tenant_id, api_key)."""
    from dpp.services import ledger, tenants

    tenant_id = f"t-{uuid.uuid4().hex[:8]}"
    tenants.create_tenant(deps, tenant_id, plan)
    key = tenants.issue_key(deps, tenant_id)
    if topup_micros:
        ledger.topup(deps, tenant_id, topup_micros)
    return tenant_id, key


def submit_decision(deps, key: str, idem: str | None = None, cap_micros: int = 80_000) -> str:
    """A decision run submitted through the service (no HTTP, no worker): its run id."""
    from dpp.services import tenants
    from dpp.services.submit import Submission, submit_run
    from tests.support.inputs import DECISION

    sub = Submission("decision", DECISION, cap_micros, "")
    return str(submit_run(deps, tenants.authenticate(deps, key), idem or uuid.uuid4().hex, sub, "test").run.id)


def make_plan(deps, plan_id: str, **overrides) -> str:
    """A test plan: the pro plan's values with `overrides` (test-only plans)."""
    from dpp.adapters.repository import TenantRepository
    from dpp.services.tenants import PLANS

    values = {**PLANS["pro"], "allowed_pack_types": ["decision", "boom", "slow"], **overrides}
    with deps.db.transaction() as session:
        TenantRepository(session).upsert_plan(id=plan_id, **values)
    return plan_id


@pytest.fixture
def tenant(clean):
    """A tenant on the pro plan with $10.00 and a fresh key: (tenant_id, api_key)."""
    return make_tenant(clean)


def assert_invariants(deps, tenant_ids=None, check_redis=True):
    """SPEC §2 invariants 1-3; every integration test ends with this.

    Quiescent: every Redis hold must belong to a run the ledger holds; an orphan
    hold, a hold of a settled run or a mirror still being restored is a failure.
    """
    from dpp.services.audit import audit

    # From the last checkpoint (what the sweep does), then from the first transfer:
    # a checkpoint that hid something would make the two disagree.
    report = audit(deps, tenant_ids, check_redis=check_redis, quiescent=True)
    assert report.ok, "money invariants violated:\n" + "\n".join(report.violations)
    full = audit(deps, tenant_ids, check_redis=check_redis, quiescent=True, full=True)
    assert full.ok, "money invariants violated (full audit):\n" + "\n".join(full.violations)
    return full
