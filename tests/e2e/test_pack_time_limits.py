"""No pack can pin a worker (issue 14, item 4), on the real worker over SQS.

- A pack that never ends is interrupted at its time limit (Celery's soft_time_limit,
  carried by its message): FAILED `PACK_TIMEOUT` at the minimum fee, and the same
  worker process goes on serving the next run.
- Pages built to burn the url pack's CPU (1 MiB declared `charset=punycode`, a
  quadratic codec; `<title>` + 260k `a<b`; `<title>` + 780k `<`, which took 35 s of
  CPU in the digest) are digested within its budget, and a decision run submitted
  right after still completes promptly (a worker process runs one run at a time).
"""
from __future__ import annotations

import time
import uuid

import pytest
import requests
from sqlalchemy import text

from dpp.domain.money import format_usd
from tests.conftest import assert_invariants, make_plan, make_tenant
from tests.e2e.test_paid_run import wait_terminal
from tests.integration.test_url_fetcher import Site, page
from tests.support.inputs import DECISION


@pytest.fixture(scope="module")
def hostile_pages():
    site = Site("127.0.0.2", {
        "/punycode": page(b"a" * (1024 * 1024), "text/html; charset=punycode"),
        "/title-a-lt-b": page(b"<title>" + b"a<b" * 260_000),
        "/title-lt": page(b"<title>" + b"<" * 780_000),
    })
    yield site
    site.stop()


def _submit(platform, key: str, pack: str, inputs: dict, cap: str = "0.50") -> str:
    r = requests.post(f"{platform['url']}/v1/runs", json={"pack_type": pack, "inputs": inputs, "max_cost_usd": cap},
                      headers={"Authorization": f"Bearer {key}", "Idempotency-Key": uuid.uuid4().hex}, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["run_id"]


def test_a_pack_past_its_time_limit_fails_pack_timeout_and_the_worker_serves_on(platform, clean):
    make_plan(clean, "test-hang", allowed_pack_types=["decision", "hang"])
    tenant_id, key = make_tenant(clean, "test-hang")
    auth = {"Authorization": f"Bearer {key}"}
    hung = _submit(platform, key, "hang", {})
    done = wait_terminal(f"{platform['url']}/v1/runs/{hung}", auth, timeout=60)
    assert done["status"] == "FAILED" and done["error"]["code"] == "PACK_TIMEOUT", done
    with clean.db.transaction() as s:  # the minimum fee, as for any run that started
        fee = s.execute(text("SELECT minimum_fee_micros FROM runs WHERE id = :id"), {"id": hung}).scalar_one()
    assert done["actual_cost_usd"] == format_usd(fee)

    after = _submit(platform, key, "decision", DECISION)
    assert wait_terminal(f"{platform['url']}/v1/runs/{after}", auth, timeout=30)["status"] == "COMPLETED"
    assert_invariants(clean, [tenant_id])


@pytest.mark.parametrize("path", ["/punycode", "/title-a-lt-b", "/title-lt"])
def test_a_page_built_to_burn_cpu_cannot_hold_up_the_next_run(platform, tenant, hostile_pages, clean, path):
    tenant_id, key = tenant
    auth = {"Authorization": f"Bearer {key}"}
    url_run = _submit(platform, key, "url", {"url": hostile_pages.url(path), "max_bytes": 1024 * 1024})
    decision = _submit(platform, key, "decision", DECISION)
    started = time.monotonic()
    done = wait_terminal(f"{platform['url']}/v1/runs/{decision}", auth, timeout=60)
    assert done["status"] == "COMPLETED", done
    # One worker process, runs in order: the decision waited for the page's digest.
    # Far inside the url pack's 30 s limit: the digest has a budget of its own.
    assert time.monotonic() - started < 20, "the page held the worker"
    fetched = wait_terminal(f"{platform['url']}/v1/runs/{url_run}", auth, timeout=60)
    assert fetched["status"] == "COMPLETED", fetched
    if path == "/punycode":
        envelope = requests.get(fetched["result_url"], timeout=5).json()
        assert envelope["result"]["charset"] == "utf-8"  # not a web page's codec: decoded as UTF-8
    assert_invariants(clean, [tenant_id])
