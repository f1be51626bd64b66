"""A dependency down at submission: 503 with Retry-After, and nothing stays reserved (SPEC §4).

Each test stops a REAL service (a private redis-server or moto_server on a free
port, started here and stopped by PID: never the shared ones), drives a real
gunicorn (sync worker, default 30 s timeout, as deployed) through HTTP, then reads
the PostgreSQL ledger and Redis directly.

"warm" variants submit once before the fault, so the API process holds live
connections/clients to the service that then dies (the usual production case);
"cold" ones meet the dead service on their first use of it.
"""
from __future__ import annotations

import dataclasses
import time
import uuid

import pytest
import requests
from sqlalchemy import select

from tests.conftest import assert_invariants
from tests.support.inputs import DECISION
from tests.support.services import gunicorn, private_moto, private_redis

TOPUP = 10_000_000
RESERVE = 500_000
BODY = {"pack_type": "decision", "inputs": DECISION, "max_cost_usd": "0.50"}
# A dead or hung dependency must get a prompt 503 (gunicorn kills a worker after 30 s).
MAX_503_SEC = 15.0


def _new_tenant(deps) -> tuple[str, str]:
    from dpp.services import ledger, tenants

    tenant_id = f"t-{uuid.uuid4().hex[:8]}"
    tenants.create_tenant(deps, tenant_id, "pro")
    key = tenants.issue_key(deps, tenant_id)
    ledger.topup(deps, tenant_id, TOPUP)
    return tenant_id, key


def _post(base: str, key: str, idem: str, timeout: float = 60) -> tuple[requests.Response, float]:
    started = time.monotonic()
    resp = requests.post(
        f"{base}/v1/runs", json=BODY,
        headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idem}, timeout=timeout,
    )
    return resp, time.monotonic() - started


def _assert_503(resp: requests.Response, elapsed: float) -> dict:
    assert resp.status_code == 503, resp.text
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    retry_after = resp.headers.get("Retry-After")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) > 0, resp.headers
    problem = resp.json()
    assert problem["type"].endswith("unavailable") and problem["status"] == 503, problem
    assert {"title", "detail", "instance", "trace_id"} <= problem.keys()
    assert "Traceback" not in resp.text
    assert elapsed < MAX_503_SEC, f"503 took {elapsed:.1f} s"
    return problem


def _books(deps, tenant_id: str):
    """(balances, runs, transfers) of one tenant, straight from PostgreSQL."""
    from dpp.adapters import orm
    from dpp.services import ledger

    with deps.db.transaction() as session:
        books = ledger.balances(session, tenant_id)
        runs = session.execute(select(orm.Run).where(orm.Run.tenant_id == tenant_id)).scalars().all()
        transfers = session.execute(
            select(orm.LedgerTransfer.run_id, orm.LedgerTransfer.kind, orm.LedgerTransfer.amount_micros)
            .where(orm.LedgerTransfer.tenant_id == tenant_id)
            .order_by(orm.LedgerTransfer.id)
        ).all()
    return books, runs, [(str(r) if r else None, k, int(a)) for r, k, a in transfers]


def _redis_keys(deps, tenant_id: str, prefix: str) -> list[str]:
    return sorted(k.decode() for k in deps.budget.client.scan_iter(match=f"{prefix}:{{{tenant_id}}}:*"))


# --------------------------------------------------------------------------------------
# Redis down
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_redis_down_answers_503_then_a_retry_rebuilds_from_the_ledger(clean, settings, tmp_path, warm):
    from dpp.bootstrap import Deps
    from dpp.domain.runs import ErrorCode
    from dpp.services import finalize

    with private_redis(tmp_path) as redis_srv, private_moto(tmp_path) as moto:
        # The queue is private too: a run accepted here must not reach the shared test queue.
        queue_url = moto.create_queue(settings.sqs_queue_name)
        deps = Deps(dataclasses.replace(
            settings, redis_url=redis_srv.url, sqs_endpoint_url=moto.url, sqs_queue_url=queue_url,
        ))
        tenant_id, key = _new_tenant(deps)
        assert deps.budget.available(tenant_id) == TOPUP
        env = {"REDIS_URL": redis_srv.url, "SQS_ENDPOINT_URL": moto.url, "SQS_QUEUE_URL": queue_url}

        with gunicorn(env, tmp_path / "api.log") as base:
            auth = {"Authorization": f"Bearer {key}"}
            before: list[str] = []  # runs accepted before the fault, still QUEUED (no worker here)
            if warm:
                resp, _ = _post(base, key, "redis-warmup")
                assert resp.status_code == 201, resp.text
                before.append(resp.json()["run_id"])
            held_before = RESERVE * len(before)
            assert deps.budget.available(tenant_id) == TOPUP - held_before

            redis_srv.stop()
            resp, elapsed = _post(base, key, "redis-down-1")
            _assert_503(resp, elapsed)
            print(f"\nredis down ({'warm' if warm else 'cold'}): 503 in {elapsed:.2f} s")

            # Nothing reserved, nothing recorded, nothing enqueued for the refused request.
            books, runs, transfers = _books(deps, tenant_id)
            assert (books.funded, books.available, books.held, books.spent) == (
                TOPUP, TOPUP - held_before, held_before, 0), books
            assert sorted(str(r.id) for r in runs) == sorted(before)
            assert transfers == [(None, "TOPUP", TOPUP)] + [(r, "RESERVE", RESERVE) for r in before]
            assert moto.depth(queue_url) == len(before)
            balance = requests.get(f"{base}/v1/balance", headers=auth, timeout=5).json()
            assert balance["held_usd"] == ("0.50" if warm else "0.00"), balance

            # Redis comes back on the same port without its data (--save ""): the mirror is gone.
            redis_srv.start()
            assert deps.budget.available(tenant_id) is None

            # The agent retries with the same key: the hold finds no balance, rebuilds it
            # from the ledger (available, and the holds of RESERVED runs) and reserves.
            resp, elapsed = _post(base, key, "redis-down-1")
            assert resp.status_code == 201, resp.text
            assert "Idempotent-Replayed" not in resp.headers
            created = resp.json()
            run_id = created["run_id"]
            assert created["status"] == "QUEUED" and created["reserved_cost_usd"] == "0.50"
            live = before + [run_id]

            books, runs, transfers = _books(deps, tenant_id)
            held = RESERVE * len(live)
            assert (books.available, books.held, books.spent) == (TOPUP - held, held, 0), books
            assert sorted(str(r.id) for r in runs) == sorted(live)
            assert transfers[-1] == (run_id, "RESERVE", RESERVE) and len(transfers) == 1 + len(live)
            # Redis mirrors *available* (holds already taken out) and holds every live reservation.
            assert deps.budget.available(tenant_id) == books.available
            assert _redis_keys(deps, tenant_id, "reserve") == sorted(f"reserve:{{{tenant_id}}}:{r}" for r in live)
            assert all(deps.budget.reservation(tenant_id, r) == RESERVE for r in live)
            assert moto.depth(queue_url) == len(live)

            # A replay is the same answer and no second reservation.
            replay, _ = _post(base, key, "redis-down-1")
            assert replay.status_code == 201 and replay.json() == created
            assert replay.headers["Idempotent-Replayed"] == "true"
            assert deps.budget.available(tenant_id) == TOPUP - held
            assert_invariants(deps, [tenant_id], check_redis=False)  # runs in flight

        # No worker here: end the runs as `dpp.sweep_stale_queued` would (never started,
        # charge 0). Each settle finds the reservation the rebuild put back or the retry made.
        for r in live:
            outcome = finalize.fail_unstarted(deps, r, ErrorCode.QUEUE_TIMEOUT, "test: never consumed")
            assert outcome is not None and outcome.charge_micros == 0
        books, _, _ = _books(deps, tenant_id)
        assert (books.available, books.held, books.spent) == (TOPUP, 0, 0), books
        assert deps.budget.available(tenant_id) == TOPUP
        assert _redis_keys(deps, tenant_id, "reserve") == []
        assert_invariants(deps, [tenant_id])  # now with the Redis check (nothing in flight)


# --------------------------------------------------------------------------------------
# Queue unreachable
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "fault,warm",
    [
        ("stopped", False),
        ("stopped", True),
        # Accepts TCP, never answers: bounded by celeryconfig's SQS client-config.
        ("frozen", False),
    ],
    ids=["stopped-cold", "stopped-warm", "frozen-cold"],
)
def test_queue_unreachable_answers_503_and_gives_the_money_back(clean, settings, tmp_path, fault, warm):
    """stopped: moto SIGTERMed (connection refused); frozen: SIGSTOPped (connects, never answers)."""
    from dpp.adapters import orm
    from dpp.domain.runs import ErrorCode
    from dpp.services import finalize

    tenant_id, key = _new_tenant(clean)  # Redis: the shared test DB of REDIS_URL
    with private_moto(tmp_path) as moto:
        queue_url = moto.create_queue(settings.sqs_queue_name)
        env = {"SQS_ENDPOINT_URL": moto.url, "SQS_QUEUE_URL": queue_url}  # S3 stays on the shared moto
        with gunicorn(env, tmp_path / "api.log") as base:
            auth = {"Authorization": f"Bearer {key}"}
            warm_run = None
            if warm:
                resp, _ = _post(base, key, "queue-warmup")
                assert resp.status_code == 201, resp.text
                warm_run = resp.json()["run_id"]
                assert moto.depth(queue_url) == 1
                # No worker consumes it: end it now, as the stale-queued sweep would.
                assert finalize.fail_unstarted(clean, warm_run, ErrorCode.QUEUE_TIMEOUT, "test") is not None

            try:
                if fault == "stopped":
                    moto.stop()
                else:
                    moto.freeze()
                resp, elapsed = _post(base, key, "queue-down-1", timeout=MAX_503_SEC + 5)
                _assert_503(resp, elapsed)
                print(f"\nqueue {fault} ({'warm' if warm else 'cold'}): 503 in {elapsed:.2f} s")

                # The run was recorded, then settled at 0 before the 503: FAILED, ENQUEUE_FAILED,
                # nothing charged, nothing held, and its idempotency key given back.
                books, runs, transfers = _books(clean, tenant_id)
                failed = [r for r in runs if str(r.id) != warm_run]
                assert len(failed) == 1, runs
                run = failed[0]
                run_id = str(run.id)
                assert (run.status, run.error_code, run.actual_cost_micros) == (
                    "FAILED", ErrorCode.ENQUEUE_FAILED.value, 0)
                assert run.idempotency_key is None
                assert (run.money_state, run.finalize_stage) == ("SETTLED", "COMMITTED")
                assert sorted(t for t in transfers if t[0] == run_id) == sorted(
                    [(run_id, "RESERVE", RESERVE), (run_id, "CHARGE", 0), (run_id, "RELEASE", RESERVE)]
                )
                assert (books.available, books.held, books.spent) == (TOPUP, 0, 0), books
                assert clean.budget.available(tenant_id) == books.available == TOPUP
                assert _redis_keys(clean, tenant_id, "reserve") == []
                assert_invariants(clean, [tenant_id])

                view = requests.get(f"{base}/v1/runs/{run_id}", headers=auth, timeout=5).json()
                assert view["status"] == "FAILED" and view["error"]["code"] == "ENQUEUE_FAILED", view
                balance = requests.get(f"{base}/v1/balance", headers=auth, timeout=5).json()
                assert (balance["available_usd"], balance["held_usd"], balance["spent_usd"]) == (
                    "10.00", "0.00", "0.00")
            finally:
                moto.thaw()  # never leave the API blocked on a frozen endpoint

            # The queue comes back: the agent's retry with the same key is a new run, not a
            # replay of the failed one.
            if fault == "stopped":
                moto.start()  # same port, fresh server: the same queue URL again
                assert moto.create_queue(settings.sqs_queue_name) == queue_url
            depth_before = moto.depth(queue_url)  # frozen: timed-out publishes may land late
            retry, _ = _post(base, key, "queue-down-1")
            assert retry.status_code == 201, retry.text
            assert "Idempotent-Replayed" not in retry.headers
            assert retry.json()["run_id"] != run_id
            assert moto.depth(queue_url) == depth_before + 1
            books, _, _ = _books(clean, tenant_id)
            assert (books.available, books.held) == (TOPUP - RESERVE, RESERVE)
            assert clean.budget.available(tenant_id) == books.available
            assert_invariants(clean, [tenant_id], check_redis=False)  # the retry is in flight
        with clean.db.transaction() as session:
            assert session.get(orm.Run, uuid.UUID(run_id)).status == "FAILED"
