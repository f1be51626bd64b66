"""`/readyz`'s answer (dpp/services/health.py) against the real services."""
from __future__ import annotations

import dataclasses

from dpp.bootstrap import Deps
from dpp.services.health import readiness


def deps_with(settings, seeded, **changes) -> Deps:
    deps = Deps(dataclasses.replace(settings, **changes))
    deps.packs = seeded.packs
    return deps


def test_ready_with_the_billing_preflight_skipped(seeded, settings):
    ready, services = readiness(deps_with(settings, seeded, billing_preflight_required=False))
    assert ready
    assert services == {"api": "ok", "database": "ok", "redis": "ok", "sqs": "ok", "s3": "ok",
                        "billing_secrets": "skipped", "admissions": "open", "tenants_frozen": "0"}


def test_the_required_billing_preflight_names_the_missing_secret(seeded, settings, monkeypatch):
    monkeypatch.delenv("DPP_SIGNING_KEY", raising=False)
    ready, services = readiness(deps_with(settings, seeded, billing_preflight_required=True))
    assert not ready
    assert services["billing_secrets"] == "missing: DPP_SIGNING_KEY"

    monkeypatch.setenv("DPP_SIGNING_KEY", "s3cret")
    ready, services = readiness(deps_with(settings, seeded, billing_preflight_required=True))
    assert ready and services["billing_secrets"] == "ok"


def test_a_dependency_down_makes_it_not_ready_and_names_it(seeded, settings):
    ready, services = readiness(deps_with(settings, seeded, redis_url="redis://127.0.0.1:9/0"))
    assert not ready
    assert services["redis"].startswith("error:") and services["database"] == "ok"
