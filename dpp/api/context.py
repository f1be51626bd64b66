"""Per-request context: trace id (W3C traceparent) and the authenticated tenant."""
from __future__ import annotations

import re
import secrets
import time

from flask import g, request

from dpp import metrics, telemetry
from dpp.bootstrap import deps
from dpp.domain.errors import AuthenticationFailed
from dpp.services import tenants

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def begin_request() -> None:
    # OpenTelemetry's Flask instrumentation has continued the agent's
    # `traceparent` (or started a trace) before this hook runs.
    trace_id = telemetry.current_trace_id()
    if trace_id is None:  # not instrumented (an app built without tracing): the header, or a new id
        match = _TRACEPARENT.match(request.headers.get("traceparent", "").strip().lower())
        trace_id = match.group(1) if match and match.group(1) != "0" * 32 else secrets.token_hex(16)
    g.trace_id = trace_id
    g.log_fields = telemetry.open_fields()
    telemetry.add_fields(trace_id=trace_id)
    g.started = time.perf_counter()


def teardown_request(_exc=None) -> None:
    if "log_fields" in g:
        telemetry.close_fields(g.pop("log_fields"))


def end_request(response):
    response.headers["X-Trace-Id"] = g.get("trace_id", "")
    # The route template, not the path: one series per endpoint, not per run id.
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    metrics.HTTP_REQUESTS.labels(request.method, route, str(response.status_code)).inc()
    if "started" in g:
        metrics.HTTP_LATENCY.labels(request.method, route).observe(time.perf_counter() - g.started)
    return response


def require_principal() -> None:
    """Authenticate the request; the tenant is then `g.principal`."""
    if request.method == "OPTIONS":
        # A CORS preflight carries no credentials by design (Fetch standard): it is
        # answered by flask-cors from the allowlist, never authenticated, and it
        # reaches no view.
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("missing Bearer API key")
    g.principal = tenants.authenticate(deps(), token.strip())
    g.tenant_id = g.principal.tenant_id
    telemetry.add_fields(tenant_id=g.tenant_id)
