"""The error mapping in one place (dpp.api.errors), with no services behind the app."""
import pytest

from dpp.api import create_app


@pytest.fixture
def client():
    app = create_app()

    def explode():
        raise RuntimeError("SELECT secret FROM ledger_transfers -- internal detail")

    app.add_url_rule("/explode", "explode", explode)
    return app.test_client()


def test_an_unhandled_exception_is_a_500_problem_without_internals(client):
    r = client.get("/explode", headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    assert r.status_code == 500 and r.mimetype == "application/problem+json"
    body = r.get_data(as_text=True)
    assert "SELECT" not in body and "Traceback" not in body and "RuntimeError" not in body
    assert r.json["trace_id"] == "0af7651916cd43dd8448eb211c80319c"  # the caller's W3C trace id
    assert {"type", "title", "status", "detail", "instance"} <= r.json.keys()


def test_unknown_routes_and_methods_are_problems_too(client):
    assert client.get("/nowhere").mimetype == "application/problem+json"
    r = client.delete("/health")
    assert r.status_code == 405 and "GET" in r.headers["Allow"] and r.json["status"] == 405


def test_health_needs_nothing(client):
    assert client.get("/health").json["status"] == "healthy"


def test_production_does_not_serve_metrics_on_the_public_port(monkeypatch):
    """Issue 14: /metrics (every tenant's traffic, the money totals) was served on the
    API's public port in production; there it moves to DPP_METRICS_PORT (gunicorn.conf.py)."""
    from dpp.config import reset_settings
    from tests.unit.test_config import PRODUCTION

    assert create_app().test_client().get("/metrics").status_code == 200  # development: here
    import os

    for name in [n for n in os.environ if n.startswith(("SQS_", "S3_", "AWS_", "DPP_"))]:
        monkeypatch.delenv(name)  # a test stack's loopback endpoints, test packs and keys
    for name, value in PRODUCTION.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    try:
        r = create_app().test_client().get("/metrics")
        assert r.status_code == 404 and r.mimetype == "application/problem+json"
        assert "DPP_METRICS_PORT" in r.json["detail"] and "dpp_" not in r.get_data(as_text=True)
    finally:
        monkeypatch.undo()
        reset_settings()
