"""Request bodies (dpp.api.body), with no services behind the app: what is not
JSON, or is nested too deep, is a 400 problem at the parse (issue 14)."""
import pytest
from flask import request

from dpp.api import create_app
from dpp.api.body import MAX_DEPTH, too_deep


@pytest.fixture
def client():
    app = create_app()

    def echo():
        return {"parsed": request.get_json()}

    app.add_url_rule("/echo", "echo", echo, methods=["POST"])
    return app.test_client()


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
def test_non_finite_numbers_are_refused(client, constant):
    """NaN and Infinity are not JSON; 1e999 is (found by tests/e2e/test_hostile_bodies.py)
    but parses to infinity, which the payload hash then refused: a 500."""
    r = client.post("/echo", data='{"inputs": {"x": %s}}' % constant, content_type="application/json")
    assert r.status_code == 400 and r.mimetype == "application/problem+json"
    assert constant.lstrip("-") in r.json["detail"]


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 965, 970, 5_000, 100_000])
def test_any_depth_past_the_limit_is_a_400(client, depth):
    r = client.post("/echo", data="[" * depth + "]" * depth, content_type="application/json")
    assert r.status_code == 400 and "levels deep" in r.json["detail"]


def test_the_limit_itself_parses(client):
    r = client.post("/echo", data="[" * MAX_DEPTH + "]" * MAX_DEPTH, content_type="application/json")
    assert r.status_code == 200


def test_depth_counts_objects_and_arrays_without_recursion():
    value: object = 1
    for i in range(100_000):
        value = {"k": value} if i % 2 else [value]
    assert too_deep(value)
    assert not too_deep({"a": [1, {"b": [2]}]}, limit=4) and too_deep({"a": [1, {"b": [[2]]}]}, limit=4)
