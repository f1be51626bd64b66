"""Liveness and readiness probes, and the Prometheus scrape endpoint."""
from flask import Blueprint, Response, jsonify

from dpp import __version__, metrics
from dpp.bootstrap import deps
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
    body, content_type = metrics.render()
    return Response(body, content_type=content_type)
