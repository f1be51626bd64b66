"""Readiness: can this process reach what a submission needs?"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait

from sqlalchemy import text

from dpp.adapters.repository import PLATFORM
from dpp.services import admissions

BILLING_SECRETS = ("DPP_SIGNING_KEY",)
# The probes run side by side and the answer comes by then, whatever still hangs:
# under the chart's readinessProbe timeoutSeconds (8). One after the other, a hung
# PostgreSQL (5 s per wait, twice) alone took 15 s, and the kubelet saw no answer.
DEADLINE_SEC = 6.0


def readiness(deps) -> tuple[bool, dict[str, str]]:
    services = {"api": "ok"}

    def db():
        with deps.db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def sqs():
        from dpp.adapters.aws import client

        s = deps.settings
        sqs = client(s, "sqs", s.sqs_endpoint_url)
        url = s.sqs_queue_url or sqs.get_queue_url(QueueName=s.sqs_queue_name)["QueueUrl"]
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])

    def admissions_state():
        held = admissions.closed(deps)
        paused = next((h for h in held if h["scope"] == PLATFORM), None)
        return (f"paused: {paused['reason']}" if paused else "open",
                str(sum(h["kind"] == "freeze" for h in held)))

    pool = ThreadPoolExecutor(max_workers=5, thread_name_prefix="readyz")
    probes = {pool.submit(probe): name for name, probe in (
        ("database", db), ("redis", deps.budget.ping), ("sqs", sqs), ("s3", deps.results.ping),
        ("admissions", admissions_state))}
    done, _ = wait(probes, timeout=DEADLINE_SEC)
    pool.shutdown(wait=False)  # a probe still waiting ends at its own client timeout
    for future, name in probes.items():
        if future not in done:
            outcome = "timeout"
        elif future.exception() is not None:  # a readiness probe reports, it never raises
            outcome = type(future.exception()).__name__
        else:
            outcome = None
        if name == "admissions":
            # Shown, never a reason to be unready: a paused platform still serves reads
            # and its runs in flight, so its pods must stay in the load balancer.
            if outcome is None:
                services["admissions"], services["tenants_frozen"] = future.result()
            else:  # the database check says why
                services["admissions"] = f"unknown: {outcome}"
        else:
            services[name] = "ok" if outcome is None else f"error: {outcome}"
    if deps.settings.billing_preflight_required:
        missing = [name for name in BILLING_SECRETS if not os.environ.get(name)]
        services["billing_secrets"] = "ok" if not missing else f"missing: {', '.join(missing)}"
    else:
        services["billing_secrets"] = "skipped"
    ready = all(v in ("ok", "skipped") for k, v in services.items() if k not in ("admissions", "tenants_frozen"))
    return ready, services
