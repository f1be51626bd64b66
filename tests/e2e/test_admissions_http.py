"""The platform's admissions paused and resumed over HTTP, across an API restart (issue 14)."""
from __future__ import annotations

import requests

from dpp.services import admissions
from tests.conftest import assert_invariants, make_tenant
from tests.e2e.test_api_contract import post_run, wait_all_terminal


def test_a_pause_survives_an_api_restart_and_reads_go_on(platform, clean, tmp_path):
    from tests.support.services import gunicorn

    tenant_id, key = make_tenant(clean)
    auth = {"Authorization": f"Bearer {key}"}
    first = post_run(platform["url"], key, idem="before-pause")
    assert first.status_code == 201, first.text
    admissions.pause(clean, reason="maintenance window", operator="alice")
    try:
        for attempt in range(2):  # the API that saw the pause, then a freshly started one
            with gunicorn({}, tmp_path / f"api-{attempt}.log") as base:
                refused = post_run(base, key)
                assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 30, refused.text
                assert refused.json()["type"].endswith("/admissions-paused"), refused.json()
                replay = post_run(base, key, idem="before-pause")
                assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
                assert requests.get(f"{base}/v1/balance", headers=auth, timeout=5).status_code == 200
                ready = requests.get(f"{base}/readyz", timeout=10)
                assert ready.status_code == 200, ready.text  # stays in the load balancer
                assert ready.json()["services"]["admissions"] == "paused: maintenance window"
                assert "dpp_admissions_paused 1.0" in requests.get(f"{base}/metrics", timeout=5).text
    finally:
        admissions.resume(clean, reason="window over", operator="alice")
    again = post_run(platform["url"], key)
    assert again.status_code == 201, again.text
    wait_all_terminal(clean, tenant_id)  # the run accepted before the pause settled meanwhile
    assert_invariants(clean, [tenant_id])
