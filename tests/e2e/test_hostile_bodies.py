"""Hypothesis over POST /v1/runs' body, beside schemathesis (issue 14): whatever an
agent sends, the answer is never a 5xx, and a 4xx records no run and holds nothing.

Schemathesis generates from the document, so it sends what the schema describes;
these bodies are what it does not: JSON's edges (non-finite numbers, deep nesting,
huge integers), strings with NUL, lone surrogates and bidi overrides, money with
whitespace or signs, and well-formed submissions mixed in so that 201s happen too.
"""
from __future__ import annotations

import json
import uuid

import requests
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import func, select

from dpp.adapters import orm
from tests.conftest import assert_invariants, make_plan, make_tenant
from tests.e2e.test_openapi_schemathesis import _wait_settled
from tests.support.inputs import DECISION

HOSTILE_TEXT = st.sampled_from(["a\x00b", "\ud800", "\udfff", "\u202eevil", "\u2066x\u2069", "\ufeff", "", " ",
                                "x" * 10_000, "\U0001f4b8", "é", "\n", "null", "NaN"])
TEXT = st.one_of(HOSTILE_TEXT, st.text(max_size=40))
NUMBER = st.one_of(st.integers(min_value=-(10 ** 40), max_value=10 ** 40),
                   st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0, -0.0, 1e308, 5e-324]))
LEAF = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
VALUE = st.recursive(LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                   st.dictionaries(TEXT, inner, max_size=4)), max_leaves=12)
MONEY = st.one_of(st.sampled_from(["0.50", "1.00", "1.00\n", " 0.50", "-0.50", "+1", "1e2", "0.5000001", "NaN",
                                   "Infinity", "0x10", "٠.٥٠", "1_000", "99999999999999999999", ""]),
                  NUMBER, TEXT, st.none())
PACK = st.one_of(st.sampled_from(["decision", "url", "boom", "Decision", "decision\x00", "\u202edecision", ""]), TEXT)


@st.composite
def bodies(draw) -> str:
    """A request body as text: mostly JSON objects, some raw text JSON cannot encode."""
    kind = draw(st.sampled_from(["valid", "fields", "any", "raw"]))
    if kind == "valid":
        return json.dumps({"pack_type": "decision", "inputs": DECISION, "max_cost_usd": draw(MONEY)})
    if kind == "fields":
        body = {"pack_type": draw(PACK), "inputs": draw(st.one_of(VALUE, st.just(DECISION))),
                "max_cost_usd": draw(MONEY)}
        if draw(st.booleans()):
            body[draw(TEXT)] = draw(VALUE)  # an unknown field, or a duplicate one overwritten
        return json.dumps(body)
    if kind == "any":
        return json.dumps(draw(VALUE))
    constant = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "[" * 3000, "{\"a\":" * 200,
                                     "\"\\ud800\"", "\"\\u0000\"", "{", "", "\x00", "[1,]"]))
    return '{"pack_type": "decision", "max_cost_usd": "0.50", "inputs": {"question": "q", "x": %s}}' % constant


def _runs(deps, tenant_id: str) -> int:
    with deps.db.transaction() as session:
        return session.execute(select(func.count()).select_from(orm.Run).where(orm.Run.tenant_id == tenant_id)).scalar_one()


def test_no_body_gets_a_5xx_and_no_refused_body_moves_money(platform, clean):
    make_plan(clean, "test-hostile", rate_limit_per_min=100_000, max_concurrent_runs=100_000)
    tenant_id, key = make_tenant(clean, "test-hostile", topup_micros=1_000_000_000)
    statuses: dict[int, int] = {}

    with requests.Session() as session:
        @settings(max_examples=150, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(body=bodies())
        def post(body: str) -> None:
            runs_before, holds_before = _runs(clean, tenant_id), set(clean.budget.hold_ids(tenant_id))
            response = session.post(
                f"{platform['url']}/v1/runs", data=body.encode("utf-8", "surrogatepass"), timeout=30,
                headers={"Authorization": f"Bearer {key}", "Idempotency-Key": uuid.uuid4().hex,
                         "Content-Type": "application/json"})
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (body[:300], response.status_code, response.text)
            assert response.headers["Content-Type"].startswith(
                "application/json" if response.status_code == 201 else "application/problem+json")
            if response.status_code >= 400:
                assert _runs(clean, tenant_id) == runs_before, ("a refused body recorded a run", body[:300])
                assert set(clean.budget.hold_ids(tenant_id)) <= holds_before, ("a refused body held money", body[:300])

        post()
    print(f"\nhostile bodies: {sorted(statuses.items())}")
    assert statuses.get(201, 0) > 0 and sum(n for s, n in statuses.items() if 400 <= s < 500) > 0
    _wait_settled(clean, tenant_id)
    assert_invariants(clean, [tenant_id])
