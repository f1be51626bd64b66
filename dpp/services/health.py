"""Readiness: can this process reach what a submission needs?"""
from __future__ import annotations

import os

from sqlalchemy import text

from dpp.adapters.repository import PLATFORM
from dpp.services import admissions

BILLING_SECRETS = ("DPP_SIGNING_KEY",)


def readiness(deps) -> tuple[bool, dict[str, str]]:
    services = {"api": "ok"}

    def check(name, probe):
        try:
            probe()
            services[name] = "ok"
        except Exception as exc:  # a readiness probe reports, it never raises
            services[name] = f"error: {type(exc).__name__}"

    def db():
        with deps.db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def sqs():
        from dpp.adapters.aws import client

        s = deps.settings
        sqs = client(s, "sqs", s.sqs_endpoint_url)
        url = s.sqs_queue_url or sqs.get_queue_url(QueueName=s.sqs_queue_name)["QueueUrl"]
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])

    check("database", db)
    check("redis", deps.budget.ping)
    check("sqs", sqs)
    check("s3", deps.results.ping)
    if deps.settings.billing_preflight_required:
        missing = [name for name in BILLING_SECRETS if not os.environ.get(name)]
        services["billing_secrets"] = "ok" if not missing else f"missing: {', '.join(missing)}"
    else:
        services["billing_secrets"] = "skipped"
    ready = all(v in ("ok", "skipped") for v in services.values())
    # Shown, never a reason to be unready: a paused platform still serves reads and
    # its runs in flight, so its pods must stay in the load balancer.
    try:
        held = admissions.closed(deps)
        paused = next((h for h in held if h["scope"] == PLATFORM), None)
        services["admissions"] = f"paused: {paused['reason']}" if paused else "open"
        services["tenants_frozen"] = str(sum(h["kind"] == "freeze" for h in held))
    except Exception as exc:  # the database check above already says why
        services["admissions"] = f"unknown: {type(exc).__name__}"
    return ready, services
