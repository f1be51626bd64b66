"""The url pack through the real API and worker: a page digested and priced, addresses refused.

The platform's processes run with DPP_URL_ALLOWLIST=127.0.0.2/32 (tests/e2e/conftest.py),
and the page server listens on 127.0.0.2: so the worker may fetch it, while 127.0.0.1 —
and `localhost`, which resolves to it — stay refused as they are in production.
"""
from __future__ import annotations

import math
import uuid

import pytest
import requests

from dpp.domain.money import format_usd
from tests.conftest import assert_invariants
from tests.e2e.test_paid_run import wait_terminal
from tests.integration.test_url_fetcher import Site, page, redirect

PAGE = (b"<!doctype html><html><head><title>DPP e2e page</title>"
        b"<meta name='description' content='Served to the worker'></head>"
        b"<body><h1>Hello worker</h1><p>One <a href='/two'>link</a>.</p></body></html>")


@pytest.fixture(scope="module")
def pages():
    site = Site("127.0.0.2", {"/": page(PAGE), "/to-metadata": redirect("http://169.254.169.254/latest/meta-data/")})
    yield site
    site.stop()


def submit(platform, key: str, url: str, max_cost: str = "0.01") -> requests.Response:
    return requests.post(
        f"{platform['url']}/v1/runs",
        json={"pack_type": "url", "inputs": {"url": url}, "max_cost_usd": max_cost},
        headers={"Authorization": f"Bearer {key}", "Idempotency-Key": uuid.uuid4().hex}, timeout=10,
    )


def test_a_url_run_completes_with_the_digest_at_its_published_price(platform, tenant, pages, clean):
    tenant_id, key = tenant
    auth = {"Authorization": f"Bearer {key}"}
    created = submit(platform, key, pages.url("/"))
    assert created.status_code == 201, created.text

    done = wait_terminal(f"{platform['url']}/v1/runs/{created.json()['run_id']}", auth)
    assert done["status"] == "COMPLETED", done
    cost = 3_000 + math.ceil(len(PAGE) / 1024)
    assert done["actual_cost_usd"] == format_usd(cost)

    envelope = requests.get(done["result_url"], timeout=5).json()
    result = envelope["result"]
    assert (result["final_url"], result["status"], result["title"], result["description"]) == (
        pages.url("/"), 200, "DPP e2e page", "Served to the worker")
    assert result["text_excerpt"] == "Hello worker One link."
    assert result["links"] == [pages.url("/two")]
    assert envelope["pack_type"] == "url" and envelope["pack_version"] == "1.0.0"
    assert pages.seen[-1]["headers"]["Host"] == f"127.0.0.2:{pages.port}"

    balance = requests.get(f"{platform['url']}/v1/balance", headers=auth, timeout=5).json()
    assert balance["spent_usd"] == format_usd(cost) and balance["held_usd"] == "0.00"
    assert_invariants(clean)


@pytest.mark.parametrize("url, message", [
    ("http://169.254.169.254/latest/meta-data/", "address 169.254.169.254 is not allowed (cloud metadata)"),
    ("http://[::ffff:169.254.169.254]/", "address ::ffff:169.254.169.254 is not allowed "
                                         "(cloud metadata via IPv4-mapped 169.254.169.254)"),
    ("http://127.0.0.1:6379/", "address 127.0.0.1 is not allowed (loopback)"),
])
def test_a_literal_refused_address_is_refused_at_submission_and_costs_nothing(platform, tenant, clean, url, message):
    _, key = tenant
    refused = submit(platform, key, url)
    assert refused.status_code == 422, refused.text
    assert refused.headers["Content-Type"].startswith("application/problem+json")
    assert refused.json()["errors"] == {"inputs.url": [message]}
    balance = requests.get(f"{platform['url']}/v1/balance", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()
    assert (balance["available_usd"], balance["held_usd"], balance["spent_usd"]) == ("10.00", "0.00", "0.00")
    assert_invariants(clean)


def test_a_refusal_found_at_run_time_fails_url_blocked_at_the_minimum_fee(platform, tenant, pages, clean):
    # A name that resolves to loopback, and an allowed page that redirects to the metadata
    # service: neither is certain at submission, both are refused by the worker.
    _, key = tenant
    auth = {"Authorization": f"Bearer {key}"}
    seen_before = len(pages.seen)
    for url, why in ((f"http://localhost:{pages.port}/", "localhost resolves to an address that is not allowed (loopback)"),
                     (pages.url("/to-metadata"), "address 169.254.169.254 is not allowed (cloud metadata)")):
        created = submit(platform, key, url)
        assert created.status_code == 201, created.text
        done = wait_terminal(f"{platform['url']}/v1/runs/{created.json()['run_id']}", auth)
        assert done["status"] == "FAILED" and done["error"]["code"] == "URL_BLOCKED", done
        assert why in done["error"]["message"]
        assert done["actual_cost_usd"] == done["minimum_fee_usd"] == "0.005"
        assert done["result_url"] is None
    assert [r["path"] for r in pages.seen[seen_before:]] == ["/to-metadata"]  # and nothing else reached it

    balance = requests.get(f"{platform['url']}/v1/balance", headers=auth, timeout=5).json()
    assert (balance["spent_usd"], balance["held_usd"]) == ("0.01", "0.00")
    assert_invariants(clean)
