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
