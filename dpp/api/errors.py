"""RFC 9457 problem details for every error, mapped in one place.

Domain errors are types; this module alone turns them into HTTP. Anything
unexpected becomes a 500 problem carrying only the trace id: no stack trace
or SQL ever leaves the server (it goes to the log).
"""
from __future__ import annotations

import logging

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from dpp.adapters import outages
from dpp.domain import errors as e
from dpp.domain.money import format_usd

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://docs.decisionproof.dev/problems/"
RETRY_AFTER_SEC = 2  # an outage's Retry-After: short, the client backs off on its own too
ADMISSIONS_RETRY_AFTER_SEC = 60  # a pause or a freeze is lifted by a person: minutes


def problem(status: int, slug: str, title: str, detail: str, headers: dict | None = None, **extra):
    body = {
        "type": TYPE_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.path,
        "trace_id": getattr(g, "trace_id", None),
        **extra,
    }
    response = jsonify(body)
    response.status_code = status
    response.mimetype = PROBLEM_JSON
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _domain(exc: e.DppError):
    if isinstance(exc, e.InsufficientBudget):
        return problem(
            402, "insufficient-budget", "Insufficient budget",
            "The tenant's available budget is below max_cost_usd.",
            available_usd=format_usd(exc.available_micros), requested_usd=format_usd(exc.requested_micros),
        )
    if isinstance(exc, e.AuthenticationFailed):
        return problem(401, "unauthorized", "Unauthorized", str(exc), headers={"WWW-Authenticate": 'Bearer realm="dpp"'})
    if isinstance(exc, e.Forbidden):
        return problem(403, "forbidden", "Forbidden", str(exc))
    if isinstance(exc, e.RunNotFound):
        return problem(404, "not-found", "Not Found", "No such run.")
    if isinstance(exc, e.BadCursor):
        return problem(400, "bad-cursor", "Bad Request", str(exc), errors={"cursor": [str(exc)]})
    if isinstance(exc, e.ResultGone):
        return problem(410, "result-gone", "Gone", "The result is past the plan's retention and was deleted.")
    if isinstance(exc, e.ResultNotReady):
        return problem(409, "result-not-ready", "Result not available", "The run has no stored result: it is not COMPLETED.")
    if isinstance(exc, e.RateLimited):
        slug, title = (("concurrency-limited", "Too Many Runs In Flight") if exc.limit == "concurrency"
                       else ("rate-limited", "Too Many Requests"))
        return problem(
            429, slug, title, exc.detail,
            headers={"Retry-After": str(exc.retry_after_sec), **exc.headers},
        )
    if isinstance(exc, e.IdempotencyMismatch):
        return problem(409, "idempotency-mismatch", "Idempotency-Key reused", str(exc))
    if isinstance(exc, e.UnknownPackType):
        return problem(422, "validation", "Validation failed", str(exc), errors={"pack_type": [str(exc)]})
    if isinstance(exc, e.InvalidPackInputs):
        return problem(422, "validation", "Validation failed", "The pack's inputs are invalid.", errors=exc.errors)
    if isinstance(exc, e.PlanViolation):
        return problem(
            422, "plan-limit", "Not allowed by plan", exc.detail,
            errors={exc.field: [exc.detail]} if exc.field else {},
        )
    if isinstance(exc, e.AdmissionsClosed):
        if exc.kind == "pause":
            slug, title, detail = ("admissions-paused", "Admissions paused",
                                   "New runs are paused on this platform (maintenance or an incident); runs in "
                                   "flight continue and reads are served. Retry later.")
        else:
            slug, title, detail = ("admissions-frozen", "Admissions frozen",
                                   "This tenant's new runs are held while its account is reviewed; runs in "
                                   "flight continue and reads are served. Nothing was reserved.")
        return problem(503, slug, title, detail, headers={"Retry-After": str(ADMISSIONS_RETRY_AFTER_SEC)})
    if isinstance(exc, e.DependencyUnavailable):
        return _unavailable(exc.dependency, str(exc))
    return _unexpected(exc)


def _http(exc: HTTPException):
    status = exc.code or 500
    if status == 422:
        messages = getattr(exc, "data", {}).get("messages", {}) if hasattr(exc, "data") else {}
        # webargs nests by location ("json", "headers"); agents want field names.
        fields = {}
        for location_errors in messages.values():
            if isinstance(location_errors, dict):
                fields.update(location_errors)
        where = " and ".join(sorted(k if k != "json" else "body" for k in messages)) or "request"
        return problem(422, "validation", "Validation failed", f"The request's {where} is invalid.", errors=fields)
    slug = (exc.name or "error").lower().replace(" ", "-")
    detail = (getattr(exc, "data", None) or {}).get("message") or exc.description or ""
    headers = {}
    if status == 405 and getattr(exc, "valid_methods", None):
        headers["Allow"] = ", ".join(exc.valid_methods)
    return problem(status, slug, exc.name or "Error", detail, headers=headers)


def _unavailable(dependency: str, reason: str):
    log.warning("dependency unavailable", extra={"dependency": dependency, "error": reason})
    return problem(
        503, "unavailable", "Service Unavailable",
        f"A dependency ({dependency}) is unavailable; nothing was reserved. Retry later.",
        headers={"Retry-After": str(RETRY_AFTER_SEC)},
    )


def _unexpected(exc: Exception):
    # An outage met outside a service's own handling (authentication's query, a
    # GET's read, a pool that timed out) is still an outage: 503, not 500.
    dependency = outages.dependency_of(exc)
    if dependency is not None:
        return _unavailable(dependency, f"{type(exc).__name__}: {exc}")
    log.exception("unhandled error", extra={"error": repr(exc)})
    return problem(500, "internal", "Internal Server Error", "An unexpected error occurred; quote the trace_id.")


def register(app: Flask) -> None:
    app.register_error_handler(e.DppError, _domain)
    app.register_error_handler(HTTPException, _http)
    app.register_error_handler(Exception, _unexpected)
