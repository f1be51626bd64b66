"""Prometheus metrics (SPEC §6). Names are listed in docs/operations.md.

Under gunicorn, set PROMETHEUS_MULTIPROC_DIR so every worker process writes
its samples where `/metrics` can aggregate them.
"""
from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

HTTP_REQUESTS = Counter("dpp_http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "dpp_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
RUNS_SUBMITTED = Counter("dpp_runs_submitted_total", "Runs accepted at submission", ["pack_type"])
RUNS_FINISHED = Counter("dpp_runs_finished_total", "Runs that reached a terminal state", ["status", "error_code"])
MONEY_RESERVED = Counter("dpp_money_reserved_usd_micros_total", "Money reserved at submission (USD micros)")
MONEY_CHARGED = Counter("dpp_money_charged_usd_micros_total", "Money charged at settlement (USD micros)")
MONEY_RELEASED = Counter("dpp_money_released_usd_micros_total", "Money released at settlement (USD micros)")

AUDIT_REQUIRED = Counter("dpp_audit_required_total", "Runs or tenants marked AUDIT_REQUIRED / found drifting", ["reason"])
LEASE_EXPIRIES = Counter("dpp_lease_expiries_total", "Runs failed by the lease sweep")
RECONCILE_ACTIONS = Counter("dpp_reconcile_actions_total", "Reconciler decisions", ["action"])
SWEEP_RUNS = Counter("dpp_sweep_runs_total", "Runs ended by a sweep", ["sweep"])
QUEUE_DEPTH = Gauge("dpp_queue_depth_messages", "SQS run queue depth", ["state"], multiprocess_mode="max")
WORKER_HEARTBEAT = Gauge(
    "dpp_worker_heartbeat_timestamp_seconds", "Unix time of the last successful heartbeat tick",
    multiprocess_mode="max",
)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
