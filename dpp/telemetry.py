"""Traces and the log context: one trace id from the agent's request to the sweep (SPEC §6).

The trace id is OpenTelemetry's. The API's span continues a W3C `traceparent`
the agent sent (or starts a trace), the id is stored on the run (`runs.trace_id`),
Celery's instrumentation carries `traceparent` in the task message to the
worker, and a sweep that ends a run opens its span in that run's trace. Every
log line carries the current `trace_id`, and `run_id` / `tenant_id` where a
run or a tenant is being worked on (`bind`, `run_scope`).

Spans are always made (the ids must exist); they are exported only when
`OTEL_TRACES_EXPORTER` says so: `none` (the default), `console`, or `otlp`
(`OTEL_EXPORTER_OTLP_ENDPOINT`, the standard OpenTelemetry variables).
"""
from __future__ import annotations

import contextvars
import logging
import os
import secrets
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

log = logging.getLogger(__name__)

_fields: contextvars.ContextVar[dict] = contextvars.ContextVar("dpp_log_fields", default={})
_provider = None  # this process's TracerProvider (not the global one: see setup_tracing)
_provider_pid: int | None = None
EXPORTERS = ("none", "console", "otlp")


def setup_tracing(service: str) -> None:
    """The process's tracer provider and exporter; once per process (again after a fork)."""
    global _provider, _provider_pid
    if _provider_pid == os.getpid():
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    exporter = (os.environ.get("OTEL_TRACES_EXPORTER") or "none").strip().lower()
    if exporter not in EXPORTERS:
        raise RuntimeError(f"OTEL_TRACES_EXPORTER={exporter!r}: expected one of {', '.join(EXPORTERS)}")
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service}))
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    # Kept here and handed to the instrumentations rather than set globally:
    # OpenTelemetry allows one global provider per process, and a forked child
    # (a gunicorn worker, a Celery pool process) needs its own, since the
    # parent's export thread did not survive the fork.
    _provider, _provider_pid = provider, os.getpid()


def tracer():
    return trace.get_tracer("dpp", tracer_provider=_provider)


def instrument_flask(app) -> None:
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    FlaskInstrumentor().instrument_app(app, excluded_urls="health,readyz,metrics", tracer_provider=_provider)


def instrument_celery() -> None:
    """In the process that publishes or runs tasks (API worker, pool process, beat)."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    instrumentor = CeleryInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()  # instrumented in the parent before the fork: bind to our provider
    instrumentor.instrument(tracer_provider=_provider)


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def _is_trace_id(value: str | None) -> bool:
    return bool(value) and len(value) == 32 and all(c in "0123456789abcdef" for c in value) and value != "0" * 32


def log_fields() -> dict:
    """What the log formatter adds to every line: the bound fields and the trace id."""
    fields = dict(_fields.get())
    if "trace_id" not in fields:
        trace_id = current_trace_id()
        if trace_id:
            fields["trace_id"] = trace_id
    return fields


@contextmanager
def bind(**fields):
    """Add `fields` (run_id, tenant_id, …) to every log line inside the block."""
    token = _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v not in (None, "")}})
    try:
        yield
    finally:
        _fields.reset(token)


@contextmanager
def run_scope(name: str, trace_id: str | None, run_id: str, tenant_id: str | None = None):
    """Work on one run, logged and traced in that run's trace.

    Inside the run's own trace already (the worker, under the task's span) this
    only binds the fields. Elsewhere (a sweep started by beat) it opens span
    `name` in the run's trace, so the trace of a run that crashed ends with
    the sweep that settled it.
    """
    if not _is_trace_id(trace_id) or current_trace_id() == trace_id:
        # A trace id that is not W3C's (a run recorded by another client) is still
        # logged; only a span cannot be made in it. Settling never fails on it.
        with bind(trace_id=trace_id, run_id=run_id, tenant_id=tenant_id):
            yield
        return
    parent = SpanContext(trace_id=int(trace_id, 16), span_id=int(secrets.token_hex(8), 16), is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    with tracer().start_as_current_span(name, context=trace.set_span_in_context(NonRecordingSpan(parent)),
                                      attributes={"dpp.run_id": run_id, "dpp.tenant_id": tenant_id or ""}):
        with bind(trace_id=trace_id, run_id=run_id, tenant_id=tenant_id):
            yield


def open_fields() -> contextvars.Token:
    """Start an empty set of log fields (one HTTP request); `close_fields` ends it."""
    return _fields.set({})


def add_fields(**fields) -> None:
    """Add to the fields opened by `open_fields` (the request's tenant, once known)."""
    _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v not in (None, "")}})


def close_fields(token: contextvars.Token) -> None:
    _fields.reset(token)
