"""Liveness and readiness probes, and the Prometheus scrape endpoint."""
from flask import Blueprint, Response, jsonify

from dpp import __version__, metrics
from dpp.api.errors import problem
from dpp.bootstrap import deps
from dpp.config import get_settings
from dpp.services.health import readiness

blp = Blueprint("health", __name__)


@blp.get("/health")
def health():
    return jsonify(status="healthy", version=__version__)


@blp.get("/readyz")
def readyz():
    ready, services = readiness(deps())
    return jsonify(status="ready" if ready else "not_ready", services=services), 200 if ready else 503


@blp.get("/metrics")
def prometheus():
    # In production the samples (tenants' traffic, money totals) are not for the
    # public port: gunicorn's master serves them on DPP_METRICS_PORT (gunicorn.conf.py),
    # as the worker and beat do. A local platform keeps them here too.
    if get_settings().env == "production":
        return problem(404, "not-found", "Not Found", "Metrics are served on DPP_METRICS_PORT, not on this port.")
    body, content_type = metrics.render()
    return Response(body, content_type=content_type)
