"""What `/v1/runs` and `/v1/usage` say, not only that they answer (issue 14, item 9).

Runs of one tenant, two completed and one failed, driven over HTTP through the real
gunicorn and worker: the list is newest first, its status filter keeps exactly the
runs of that status, its pages cover every run once, and the usage row of the day
counts them and carries the ledger's charges and releases to the micro-dollar.
"""
from __future__ import annotations

import time
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import requests
from sqlalchemy import text

from tests.conftest import assert_invariants, make_plan, make_tenant
from tests.support.inputs import DECISION


def _submit(platform, key: str, idem: str, pack: str, inputs: dict) -> str:
    r = requests.post(f"{platform['url']}/v1/runs", json={"pack_type": pack, "inputs": inputs, "max_cost_usd": "0.50"},
                      headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idem}, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["run_id"]


def _get(platform, key: str, path: str, **params) -> dict:
    r = requests.get(f"{platform['url']}{path}", params=params, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _settled(platform, key: str, run_ids: list[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        runs = {run_id: _get(platform, key, f"/v1/runs/{run_id}") for run_id in run_ids}
        if all(r["status"] in ("COMPLETED", "FAILED") for r in runs.values()):
            return runs
        assert time.monotonic() < deadline, {k: r["status"] for k, r in runs.items()}
        time.sleep(0.2)


def test_the_run_list_is_newest_first_filtered_by_status_and_paged_without_gaps(platform, clean):
    make_plan(clean, "test-contents")
    tenant_id, key = make_tenant(clean, "test-contents")
    submitted = []
    for n, (pack, inputs) in enumerate([("decision", DECISION), ("boom", {}), ("decision", DECISION)]):
        submitted.append(_submit(platform, key, f"contents-{n}", pack, inputs))
    runs = _settled(platform, key, submitted)
    assert [runs[r]["status"] for r in submitted] == ["COMPLETED", "FAILED", "COMPLETED"]

    listed = _get(platform, key, "/v1/runs")
    assert [r["run_id"] for r in listed["items"]] == submitted[::-1] and listed["next_cursor"] is None
    assert [r["status"] for r in listed["items"]] == ["COMPLETED", "FAILED", "COMPLETED"]
    stamps = [r["created_at"] for r in listed["items"]]
    assert stamps == sorted(stamps, reverse=True)
    assert [r["run_id"] for r in _get(platform, key, "/v1/runs", status="FAILED")["items"]] == [submitted[1]]
    assert [r["run_id"] for r in _get(platform, key, "/v1/runs", status="COMPLETED")["items"]] == [submitted[2],
                                                                                                     submitted[0]]
    assert _get(platform, key, "/v1/runs", status="QUEUED")["items"] == []

    paged, cursor = [], None
    while True:
        page = _get(platform, key, "/v1/runs", limit=1, **({"cursor": cursor} if cursor else {}))
        assert len(page["items"]) <= 1
        paged += [r["run_id"] for r in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert paged == submitted[::-1]

    # Another tenant's runs are not in this list, and this tenant's are not in theirs.
    _, other = make_tenant(clean, "test-contents")
    assert _get(platform, other, "/v1/runs")["items"] == []
    assert_invariants(clean, [tenant_id])


def test_the_usage_row_of_the_day_counts_the_runs_and_carries_the_ledgers_money(platform, clean):
    make_plan(clean, "test-contents")
    tenant_id, key = make_tenant(clean, "test-contents")
    submitted = [_submit(platform, key, f"usage-{n}", pack, inputs)
                 for n, (pack, inputs) in enumerate([("decision", DECISION), ("boom", {}), ("decision", DECISION)])]
    runs = _settled(platform, key, submitted)
    with clean.db.transaction() as s:
        moved = dict(s.execute(text("SELECT kind, sum(amount_micros) FROM ledger_transfers "
                                    "WHERE tenant_id = :t GROUP BY kind"), {"t": tenant_id}).all())
    days = {datetime.fromisoformat(r["finished_at"]).astimezone(timezone.utc).date() for r in runs.values()}
    first, last = min(days), max(days)

    usage = _get(platform, key, "/v1/usage", start_date=(first - timedelta(days=3)).isoformat(),
                 end_date=(last + timedelta(days=3)).isoformat())["days"]
    assert [row["date"] for row in usage] == sorted(d.isoformat() for d in days)  # no empty days, in order
    assert sum(row["runs_completed"] for row in usage) == 2
    assert sum(row["runs_failed"] for row in usage) == 1
    assert sum(Decimal(row["charged_usd"]) for row in usage) == Decimal(int(moved["CHARGE"])) / 1_000_000
    assert sum(Decimal(row["released_usd"]) for row in usage) == Decimal(int(moved["RELEASE"])) / 1_000_000
    assert sum(Decimal(runs[r]["actual_cost_usd"]) for r in submitted) == Decimal(int(moved["CHARGE"])) / 1_000_000

    # The range is inclusive at both ends, and a range without runs is empty, not an error.
    one = _get(platform, key, "/v1/usage", start_date=first.isoformat(), end_date=first.isoformat())["days"]
    assert [row["date"] for row in one] == [first.isoformat()]
    assert _get(platform, key, "/v1/usage", start_date="2001-01-01", end_date="2001-01-31")["days"] == []
    assert date.fromisoformat(usage[0]["date"]) >= first
    assert_invariants(clean, [tenant_id])
