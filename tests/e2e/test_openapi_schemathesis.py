"""Schemathesis over /openapi.json against the real gunicorn + worker (issue 3).

One test per operation the document lists. Each gets a fresh tenant on a plan whose
limits never get in the way, then its documented examples, the coverage phase
(boundary and negative values) and a bounded, deterministic fuzzing phase are sent to
the real server. Every response must be: not a 5xx; a status the document lists for
that operation; of the documented content type (so every error is
`application/problem+json`); carrying the documented required headers; and valid
against the documented schema. Afterwards, with every run settled, the money
invariants (SPEC §2) must still hold.

The document is the app's own `/openapi.json`, read through a Flask test client in a
child process at collection time (pytest parametrizes before the server's port is known);
`test_the_server_serves_the_document_under_test` checks that gunicorn serves the same.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS as REGISTERED
from schemathesis.checks import load_all_checks
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy import text

from tests.conftest import assert_invariants, make_plan, make_tenant
from tests.e2e.conftest import E2E_PACKS

load_all_checks()
# Every check schemathesis has (issue 14): conformance of status, content type,
# headers and schema, and the behavioural ones (negative data rejected, positive
# data accepted, a missing required header or an unsupported method refused, the
# Allow header, auth that is not ignored, object-level authorization, ...).
# Rules no JSON Schema can state (docs/api.md, "What the document cannot say"):
# schema-valid data they refuse is not a wrong refusal, and nothing else is excused.
# - an opaque `cursor` we did not issue: 400 `bad-cursor`;
# - a pack's own rules over its `inputs` (a score for every option and criterion, ...),
#   which depend on `pack_type`: 422 with errors under `inputs` only;
# - the usage range (end on or after start, at most 366 days): 422 on `end_date` only;
# - the plan's and the pack's bounds on `max_cost_usd` (at least the run's price, at
#   most the plan's cap per run): 422 `plan-limit`.
CROSS_FIELD = {("POST", "/v1/runs"): ("inputs",), ("GET", "/v1/usage"): ("end_date",)}


def _bad_range(query: dict) -> bool:
    """The usage range rule itself: end before start, or longer than 366 days."""
    try:
        start, end = date.fromisoformat(query["start_date"]), date.fromisoformat(query["end_date"])
    except (KeyError, TypeError, ValueError):
        return False
    return end < start or (end - start).days > 366


@schemathesis.check
def positive_data_acceptance_but_cross_field_rules(ctx, response, case):
    """positive_data_acceptance, excusing exactly the refusals CROSS_FIELD names."""
    if response.status_code in (400, 422) and response.headers.get("content-type", [""])[0].startswith(
            "application/problem+json"):
        problem = response.json()
        kind = problem.get("type", "").rsplit("/", 1)[-1]
        fields = list((problem.get("errors") or {}).keys())
        allowed = CROSS_FIELD.get((case.method.upper(), case.path), ())
        if kind == "bad-cursor" and "cursor" in (case.query or {}):
            return None
        if kind == "plan-limit" and (case.method.upper(), case.path) == ("POST", "/v1/runs"):
            return None
        if kind == "validation" and fields and all(f.split(".")[0] in allowed for f in fields):
            if case.path != "/v1/usage" or _bad_range(case.query or {}):
                return None
    return positive_data_acceptance(ctx, response, case)


CHECKS = [c for c in REGISTERED.get_all() if c is not positive_data_acceptance]
CHECKS.append(positive_data_acceptance_but_cross_field_rules)
MAX_EXAMPLES = 25  # fuzzing phase, per operation; the examples and coverage phases come on top
SEED = 20240603
BUDGET_MICROS = 1_000_000 * 1_000_000  # $1,000,000: most POSTs are refused anyway (402/422 are fine)
ROOT = Path(__file__).resolve().parents[2]


def _document() -> dict:
    # In a child process: create_app() configures logging and caches settings, which
    # must not leak into the rest of the test session.
    code = (
        "import json, sys\n"
        "from dpp.api import create_app\n"
        "response = create_app().test_client().get('/openapi.json')\n"
        "assert response.status_code == 200, response.status_code\n"
        "sys.stdout.write(json.dumps(response.get_json()))\n"
    )
    env = {**os.environ, "DPP_EXTRA_PACKS": E2E_PACKS}  # as the server under test
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(
    DOCUMENT,
    config=schemathesis.Config.from_dict({
        "seed": SEED,
        "request-timeout": 30,
        "generation": {
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",
            # The tenant's key is the credential (sent by the test); do not fuzz Authorization.
            "with-security-parameters": False,
        },
    }),
)


def _wait_settled(deps, tenant_id: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with deps.db.transaction() as session:
            active = session.execute(
                text("SELECT count(*) FROM runs WHERE tenant_id = :t AND status IN ('QUEUED', 'PROCESSING')"),
                {"t": tenant_id},
            ).scalar_one()
        if active == 0:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{active} run(s) of {tenant_id} still in flight after {timeout:g} s")
        time.sleep(0.2)


@pytest.fixture
def fuzz_client(platform, clean):
    """Base URL and auth header of a fresh tenant; checks the books once the operation was fuzzed."""
    make_plan(clean, "test-fuzz", rate_limit_per_min=100_000, max_concurrent_runs=100_000)
    tenant_id, key = make_tenant(clean, "test-fuzz", topup_micros=BUDGET_MICROS)
    with requests.Session() as session:
        yield {
            "base_url": platform["url"],
            "session": session,
            "headers": {"Authorization": f"Bearer {key}"},
            "tenant_id": tenant_id,
        }
    # An assertion here reports as an error in the teardown of that operation's test.
    _wait_settled(clean, tenant_id)
    assert_invariants(clean)


def test_the_server_serves_the_document_under_test(platform):
    served = requests.get(f"{platform['url']}/openapi.json", timeout=30)
    assert served.status_code == 200
    assert served.json() == DOCUMENT


@schema.parametrize()
@settings(
    derandomize=True,
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_response_conforms_to_the_document(case, fuzz_client):
    case.call_and_validate(
        base_url=fuzz_client["base_url"],
        session=fuzz_client["session"],
        headers=fuzz_client["headers"],
        checks=CHECKS,
    )


def test_calls_chained_through_the_documents_links_conform(fuzz_client):
    """Schemathesis' stateful phase (issue 14): sequences of calls where each takes its
    values from an earlier response along the document's `links` (a run created, then
    read, its result fetched; a page, then the next), every response held to CHECKS.
    The fixture then waits for the runs to settle and checks the books."""
    workflow = schema.as_state_machine()
    assert workflow.bundles, "the document declares no links to follow"
    seen: list[tuple[str, str, int]] = []

    class Workflow(workflow):
        def after_call(self, response, case):
            seen.append((case.method.upper(), case.path, response.status_code))

        def get_call_kwargs(self, case):
            return {"base_url": fuzz_client["base_url"], "session": fuzz_client["session"],
                    "headers": fuzz_client["headers"]}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    Workflow.run(settings=settings(max_examples=MAX_EXAMPLES, stateful_step_count=6, derandomize=True,
                                   deadline=None, database=None, suppress_health_check=list(HealthCheck)))
    # A run's own id only comes from a POST's answer: a 200 on it is a link followed.
    followed = {(m, p) for m, p, status in seen if status == 200 and "{run_id}" in p}
    assert ("GET", "/v1/runs/{run_id}") in followed, sorted(set(seen))


# --- every documented status, at least once, on real data -------------------------------
# Random inputs rarely reach a real run, another tenant's state or a plan limit, so this
# walks a run's life and the rarer refusals by hand, each response validated by the same
# checks against the same document.


def _call(fuzz_client, label, expected, *, key=None, body=None, **case_kwargs):
    method, path = label.split(" ", 1)
    if body is not None:
        case_kwargs.update(body=body, media_type="application/json")
    case = schema[path][method].Case(**case_kwargs)
    headers = dict(fuzz_client["headers"])
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    response = case.call_and_validate(
        base_url=fuzz_client["base_url"], session=fuzz_client["session"], headers=headers, checks=CHECKS,
    )
    assert response.status_code == expected, (label, response.status_code, response.text)
    return response


def _validate_raw(fuzz_client, label, response, expected):
    method, path = label.split(" ", 1)
    schema[path][method].Case().validate_response(response, checks=CHECKS)
    assert response.status_code == expected, (label, response.status_code, response.text)


def test_every_documented_status_conforms_on_real_data(fuzz_client, clean):
    from dpp.services import tenants

    decision = DOCUMENT["paths"]["/v1/runs"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    body = decision["decision"]["value"]
    idem = {"Idempotency-Key": "conformance-1"}
    created = _call(fuzz_client, "POST /v1/runs", 201, headers=idem, body=body).json()
    replay = _call(fuzz_client, "POST /v1/runs", 201, headers=idem, body=body)
    assert replay.headers.get("idempotent-replayed") == ["true"]  # schemathesis: lowercase names, list values
    _call(fuzz_client, "POST /v1/runs", 409, headers=idem, body={**body, "max_cost_usd": "0.60"})
    _call(fuzz_client, "POST /v1/runs", 422, headers={"Idempotency-Key": "c-2"}, body={**body, "max_cost_usd": "1e3"})
    _call(fuzz_client, "POST /v1/runs", 422, headers={"Idempotency-Key": "c-3"}, body={**body, "max_cost_usd": "60.00"})
    _call(fuzz_client, "POST /v1/runs", 400, body=body)  # no Idempotency-Key
    failed = _call(fuzz_client, "POST /v1/runs", 201, headers={"Idempotency-Key": "c-4"},
                   body={"pack_type": "boom", "inputs": {}, "max_cost_usd": "0.10"}).json()
    run_id = created["run_id"]
    _call(fuzz_client, "GET /v1/runs/{run_id}", 200, path_parameters={"run_id": run_id})
    _call(fuzz_client, "GET /v1/runs/{run_id}/result", 409, path_parameters={"run_id": failed["run_id"]})

    base, session = fuzz_client["base_url"], fuzz_client["session"]
    post_headers = {**fuzz_client["headers"], "Idempotency-Key": "c-5"}
    _validate_raw(fuzz_client, "POST /v1/runs", session.post(
        f"{base}/v1/runs", data="x", headers={**post_headers, "Content-Type": "text/plain"}, timeout=30), 415)
    _validate_raw(fuzz_client, "POST /v1/runs", session.post(
        f"{base}/v1/runs", data=b"{" * (300 * 1024), headers={**post_headers, "Content-Type": "application/json"},
        timeout=30), 413)
    _validate_raw(fuzz_client, "POST /v1/runs", session.post(
        f"{base}/v1/runs", data=b'{"pack_type": ', headers={**post_headers, "Content-Type": "application/json"},
        timeout=30), 400)

    _wait_settled(clean, fuzz_client["tenant_id"])
    done = _call(fuzz_client, "GET /v1/runs/{run_id}", 200, path_parameters={"run_id": run_id}).json()
    assert done["status"] == "COMPLETED" and done["result_url"], done
    assert _call(fuzz_client, "GET /v1/runs/{run_id}", 200,
                 path_parameters={"run_id": failed["run_id"]}).json()["error"]["code"]
    _call(fuzz_client, "GET /v1/runs/{run_id}/result", 200, path_parameters={"run_id": run_id})
    page = _call(fuzz_client, "GET /v1/runs", 200, query={"limit": 1}).json()
    _call(fuzz_client, "GET /v1/runs", 200, query={"limit": 1, "cursor": page["next_cursor"]})
    _call(fuzz_client, "GET /v1/runs", 200, query={"status": "FAILED"})
    _call(fuzz_client, "GET /v1/runs", 400, query={"cursor": "not-a-cursor"})
    page = _call(fuzz_client, "GET /v1/ledger", 200, query={"limit": 1}).json()
    _call(fuzz_client, "GET /v1/ledger", 200, query={"limit": 1, "cursor": page["next_cursor"]})
    day = date.fromisoformat(done["created_at"][:10])  # settled the same UTC day, or the next
    usage = {"start_date": day.isoformat(), "end_date": (day + timedelta(days=1)).isoformat()}
    assert _call(fuzz_client, "GET /v1/usage", 200, query=usage).json()["days"]
    _call(fuzz_client, "GET /v1/usage", 422, query={**usage, "end_date": "2000-01-01"})
    _call(fuzz_client, "GET /v1/balance", 200)

    with clean.db.transaction() as s:  # the result is now past its retention
        s.execute(text("UPDATE runs SET retention_until = now() - interval '1 second' WHERE id = :id"), {"id": run_id})
    _call(fuzz_client, "GET /v1/runs/{run_id}/result", 410, path_parameters={"run_id": run_id})

    make_plan(clean, "test-fuzz-decision", allowed_pack_types=["decision"])
    _, other_key = make_tenant(clean, "test-fuzz-decision", topup_micros=1_000)
    _call(fuzz_client, "GET /v1/runs/{run_id}", 404, key=other_key, path_parameters={"run_id": run_id})
    _call(fuzz_client, "GET /v1/runs/{run_id}/result", 404, key=other_key, path_parameters={"run_id": run_id})
    _call(fuzz_client, "POST /v1/runs", 402, key=other_key, headers={"Idempotency-Key": "c-6"}, body=body)
    _call(fuzz_client, "POST /v1/runs", 403, key=other_key, headers={"Idempotency-Key": "c-7"},
          body={"pack_type": "boom", "inputs": {}, "max_cost_usd": "0.10"})  # not in that plan
    assert tenants.revoke_key(clean, other_key)
    _call(fuzz_client, "GET /v1/balance", 403, key=other_key)
    _call(fuzz_client, "GET /v1/balance", 401, key="dpp_live_not-a-key")

    make_plan(clean, "test-fuzz-rate1", rate_limit_per_min=1, max_concurrent_runs=100)
    _, limited_key = make_tenant(clean, "test-fuzz-rate1")
    statuses = []
    for i in range(3):  # the window is fixed: of three, at least one lands after the first in a window
        # Valid ones: only a submission that passes validation is counted (docs/api.md).
        method_case = schema["/v1/runs"]["POST"].Case(
            headers={"Idempotency-Key": f"c-rate-{i}"}, body=body, media_type="application/json")
        response = method_case.call_and_validate(
            base_url=base, session=session, headers={"Authorization": f"Bearer {limited_key}"}, checks=CHECKS)
        statuses.append(response.status_code)
    assert 429 in statuses and set(statuses) <= {201, 429}, statuses
