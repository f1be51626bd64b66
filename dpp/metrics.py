"""Prometheus metrics (SPEC §6). Names are listed in docs/operations.md.

The API serves them at `/metrics`; a Celery worker or beat serves them (and
`/healthz`, for Kubernetes probes) on `DPP_METRICS_PORT` when that is set.
Where several processes count (gunicorn workers, Celery pool processes), set
PROMETHEUS_MULTIPROC_DIR, one empty directory per role, so each process
writes its samples where the server aggregates them.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

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
MIRRORS_RESTORED = Counter("dpp_budget_mirrors_restored_total",
                           "Tenants' Redis budget mirrors rebuilt from the ledger", ["cause"])
for _cause in ("redis_data_lost", "missing"):  # both series exist, at 0, before the first restore
    MIRRORS_RESTORED.labels(_cause)
REDIS_DATA_LOSSES = Counter("dpp_redis_data_losses_total", "Times the mirror sentinel was found missing")
HOLDS_REPAIRED = Counter("dpp_budget_holds_repaired_total",
                         "Redis holds given back by the orphan sweep", ["kind"])
ADMISSIONS_PAUSED = Gauge("dpp_admissions_paused", "1 while the platform's admissions are paused by hand",
                          multiprocess_mode="mostrecent")
TENANTS_FROZEN = Gauge("dpp_tenants_frozen", "Tenants whose admissions are frozen after a money alarm",
                       multiprocess_mode="mostrecent")
TENANT_FREEZES = Counter("dpp_tenant_freezes_total", "Tenants frozen automatically (AUDIT_REQUIRED or drift)")
REDRIVES = Counter("dpp_runs_redriven_total", "QUEUED runs whose message was published again")
LEASE_EXPIRIES = Counter("dpp_lease_expiries_total", "Runs failed by the lease sweep")
RECONCILE_ACTIONS = Counter("dpp_reconcile_actions_total", "Reconciler decisions", ["action"])
SWEEP_RUNS = Counter("dpp_sweep_runs_total", "Runs ended by a sweep", ["sweep"])
QUEUE_DEPTH = Gauge("dpp_queue_depth_messages", "SQS run queue depth", ["state"], multiprocess_mode="max")
WORKER_HEARTBEAT = Gauge(
    "dpp_worker_heartbeat_timestamp_seconds",
    "Unix time of the worker's last heartbeat (Celery's event loop, and each run's lease tick)",
    multiprocess_mode="max",
)
BEAT_TICK = Gauge("dpp_beat_tick_timestamp_seconds", "Unix time of the scheduling beat's last tick",
                  multiprocess_mode="max")
BEAT_STEP_DOWNS = Counter("dpp_beat_step_downs_total",
                          "Times the scheduling beat lost redbeat's lock (expired, taken, Redis wiped) and stepped down")
BEAT_RESEEDS = Counter("dpp_beat_schedule_reseeds_total",
                       "Times the scheduling beat found static entries missing from Redis and re-seeded them")
BROKER_SWEEP = Counter("dpp_broker_temporary_queues_deleted_total",
                       "Idle broadcast queues (dead Flower, crashed worker) deleted by dpp.sweep_broker")

log = logging.getLogger(__name__)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def serve(port: int, health: Callable[[], tuple[bool, dict]]) -> ThreadingHTTPServer:
    """`/metrics` and `/healthz` on `port` from a daemon thread (Celery worker and beat).

    `health()` answers (ok, details): 200 or 503 with the details as JSON.
    """
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] == "/metrics":
                body, content_type, status = *render(), 200
            elif self.path.split("?")[0] == "/healthz":
                ok, details = health()
                body, content_type, status = json.dumps(details).encode(), "application/json", 200 if ok else 503
            else:
                body, content_type, status = b"not found", "text/plain", 404
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # probes every few seconds: not worth a log line
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="dpp-metrics", daemon=True).start()
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        log.warning("PROMETHEUS_MULTIPROC_DIR is not set: samples of child processes are not served")
    log.info("metrics and health on :%s", port)
    return server


class Liveness:
    """When a process last showed it was alive, for `/healthz`.

    Healthy while the last beat is younger than `stale_sec`; a process that has
    not beaten yet gets `stale_sec` from its start (a slow start is not a death).
    """

    def __init__(self, stale_sec: float):
        self.stale_sec = stale_sec
        self.started = self.last = time.time()
        self.beats = 0

    def beat(self) -> None:
        self.last = time.time()
        self.beats += 1

    def age(self) -> float:
        return time.time() - self.last


def forget_dead_processes() -> int:
    """Remove the multiprocess sample files of processes that no longer run.

    A restarted worker or beat would otherwise keep adding its dead
    predecessors' counts (Prometheus reads the drop as a counter reset).
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory or not os.path.isdir(directory):
        return 0
    removed = 0
    for name in os.listdir(directory):
        pid = name.rsplit("_", 1)[-1].removesuffix(".db")
        if not pid.isdigit() or _alive(int(pid)):
            continue
        os.remove(os.path.join(directory, name))
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
