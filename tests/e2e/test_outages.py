"""Outages of every dependency over HTTP: 503 with Retry-After, nothing held (issue 14).

Each test breaks a REAL private instance (a PostgreSQL cluster, a redis-server or a
moto of its own, on free ports; never the shared ones), drives a real gunicorn at
it and then reads the ledger and the mirror. On the main of 2026-12-03 each of
these answered 500: authentication's query had no mapping, Redis's READONLY and
OOM replies were not outages to the adapters, and /result did not catch an
unreachable S3.
"""
from __future__ import annotations

import dataclasses
import time
import uuid

import pytest
import redis
import requests
from sqlalchemy import text

from tests.conftest import assert_invariants
from tests.e2e.test_dependency_failures import BODY, RESERVE, TOPUP, _assert_503, _books, _new_tenant, _post
from tests.support.services import gunicorn, private_moto, private_postgres, private_redis


def test_postgresql_stopped_answers_503_on_every_endpoint_then_recovers(settings, tmp_path):
    from dpp.bootstrap import Deps
    from dpp.services.tenants import seed_plans

    with private_postgres() as pg, private_moto(tmp_path) as moto:
        queue_url = moto.create_queue(settings.sqs_queue_name)
        deps = Deps(dataclasses.replace(settings, database_url=pg.url, sqs_endpoint_url=moto.url,
                                        sqs_queue_url=queue_url))
        seed_plans(deps)
        tenant_id, key = _new_tenant(deps)  # Redis: the shared test DB; the tenant id is new
        env = {"DATABASE_URL": pg.url, "SQS_ENDPOINT_URL": moto.url, "SQS_QUEUE_URL": queue_url}
        with gunicorn(env, tmp_path / "api.log") as base:
            auth = {"Authorization": f"Bearer {key}"}
            assert requests.get(f"{base}/v1/balance", headers=auth, timeout=5).status_code == 200  # warm pool

            pg.stop()
            for method, path in (("GET", "/v1/balance"), ("GET", "/v1/runs"), ("GET", f"/v1/runs/{uuid.uuid4()}"),
                                 ("GET", "/v1/ledger"), ("GET", "/v1/usage?start_date=2026-01-01&end_date=2026-01-02")):
                started = time.monotonic()
                resp = requests.request(method, f"{base}{path}", headers=auth, timeout=30)
                problem = _assert_503(resp, time.monotonic() - started)
                assert "database" in problem["detail"], (path, problem)
            resp, elapsed = _post(base, key, "pg-down-1")
            _assert_503(resp, elapsed)
            ready = requests.get(f"{base}/readyz", timeout=30)
            assert ready.status_code == 503 and ready.json()["services"]["database"] != "ok", ready.text
            assert deps.budget.available(tenant_id) == TOPUP  # nothing held in Redis
            assert deps.budget.hold_ids(tenant_id) == []

            pg.start()
            resp, _ = _post(base, key, "pg-down-1")  # the agent's retry, same key: a new run
            assert resp.status_code == 201, resp.text
            books, runs, _ = _books(deps, tenant_id)
            assert [str(r.id) for r in runs] == [resp.json()["run_id"]]
            assert (books.available, books.held) == (TOPUP - RESERVE, RESERVE)
            assert deps.budget.available(tenant_id) == TOPUP - RESERVE
            assert_invariants(deps, [tenant_id])


def test_postgresql_hung_answers_503_before_the_worker_timeout(settings, tmp_path):
    """SIGSTOPped: connections are accepted by the kernel and never answered. Before,
    a request waited until gunicorn killed its worker at 30 s (no answer at all)."""
    from dpp.bootstrap import Deps
    from dpp.services.tenants import seed_plans

    with private_postgres() as pg:
        deps = Deps(dataclasses.replace(settings, database_url=pg.url))
        seed_plans(deps)
        tenant_id, key = _new_tenant(deps)
        with gunicorn({"DATABASE_URL": pg.url}, tmp_path / "api.log") as base:
            auth = {"Authorization": f"Bearer {key}"}
            assert requests.get(f"{base}/v1/balance", headers=auth, timeout=5).status_code == 200  # warm pool
            pg.freeze()
            try:
                for idem in ("pg-hung-1", None):
                    started = time.monotonic()
                    if idem:
                        resp, elapsed = _post(base, key, idem, timeout=40)
                    else:
                        resp = requests.get(f"{base}/v1/balance", headers=auth, timeout=40)
                        elapsed = time.monotonic() - started
                    problem = _assert_503(resp, elapsed)
                    assert "database" in problem["detail"], problem
            finally:
                pg.thaw()
            assert deps.budget.hold_ids(tenant_id) == [] and deps.budget.available(tenant_id) == TOPUP
            assert requests.get(f"{base}/v1/balance", headers=auth, timeout=10).status_code == 200  # recovered
            assert_invariants(deps, [tenant_id], check_redis=True)


@pytest.mark.parametrize("fault", ["read_only", "out_of_memory"])
def test_redis_refusing_writes_answers_503_and_holds_nothing(clean, settings, tmp_path, fault):
    with private_redis(tmp_path) as redis_srv, private_moto(tmp_path) as moto:
        queue_url = moto.create_queue(settings.sqs_queue_name)
        from dpp.bootstrap import Deps

        deps = Deps(dataclasses.replace(settings, redis_url=redis_srv.url, sqs_endpoint_url=moto.url,
                                        sqs_queue_url=queue_url))
        tenant_id, key = _new_tenant(deps)
        env = {"REDIS_URL": redis_srv.url, "SQS_ENDPOINT_URL": moto.url, "SQS_QUEUE_URL": queue_url}
        admin = redis.Redis.from_url(redis_srv.url)
        with gunicorn(env, tmp_path / "api.log") as base:
            if fault == "read_only":  # a replica of a master that is gone: every write is READONLY
                admin.execute_command("REPLICAOF", "127.0.0.1", "1")
            else:
                admin.config_set("maxmemory-policy", "noeviction")
                admin.config_set("maxmemory", "1")
            try:
                resp, elapsed = _post(base, key, f"redis-{fault}")
                problem = _assert_503(resp, elapsed)
                assert "redis" in problem["detail"], problem
            finally:
                if fault == "read_only":
                    admin.execute_command("REPLICAOF", "NO", "ONE")
                else:
                    admin.config_set("maxmemory", "0")
            books, runs, transfers = _books(deps, tenant_id)
            assert runs == [] and (books.available, books.held) == (TOPUP, 0)
            assert deps.budget.available(tenant_id) == TOPUP and deps.budget.hold_ids(tenant_id) == []

            resp, _ = _post(base, key, f"redis-{fault}")  # writable again: the retry goes through
            assert resp.status_code == 201, resp.text
            assert deps.budget.available(tenant_id) == TOPUP - RESERVE
            assert_invariants(deps, [tenant_id])


def test_s3_unreachable_on_result_answers_503(platform, clean, tmp_path):
    from tests.e2e.test_api_contract import post_run, wait_all_terminal
    from tests.support.services import devstack

    tenant_id, key = _new_tenant(clean)
    created = post_run(platform["url"], key, body=BODY)
    assert created.status_code == 201, created.text
    run_id = created.json()["run_id"]
    wait_all_terminal(clean, tenant_id)
    auth = {"Authorization": f"Bearer {key}"}
    assert requests.get(f"{platform['url']}/v1/runs/{run_id}/result", headers=auth, timeout=10).status_code == 200

    nowhere = f"http://127.0.0.1:{devstack.free_port()}"  # nothing listens: connection refused
    with gunicorn({"S3_ENDPOINT_URL": nowhere}, tmp_path / "api.log") as base:
        started = time.monotonic()
        resp = requests.get(f"{base}/v1/runs/{run_id}/result", headers=auth, timeout=30)
        problem = _assert_503(resp, time.monotonic() - started)
        assert "s3" in problem["detail"], problem
        view = requests.get(f"{base}/v1/runs/{run_id}", headers=auth, timeout=10)
        assert view.status_code == 200 and view.json()["status"] == "COMPLETED"  # presigning needs no S3
    assert_invariants(clean, [tenant_id])


def test_s3_hung_on_result_answers_503_within_the_bound(platform, clean, settings, tmp_path):
    """SIGSTOPped: S3 accepts the connection and never answers. With botocore's 10 s
    read timeout and two attempts, GET /result took 20 s before its 503; the API's
    waits are bounded by DPP_IO_TIMEOUT_SEC (gunicorn.conf.py)."""
    import boto3

    from tests.e2e.test_api_contract import post_run, wait_all_terminal
    from tests.support.services import CREDS, REGION

    tenant_id, key = _new_tenant(clean)
    created = post_run(platform["url"], key, body=BODY)
    assert created.status_code == 201, created.text
    run_id = created.json()["run_id"]
    wait_all_terminal(clean, tenant_id)
    with clean.db.transaction() as session:
        result_key = session.execute(text("SELECT result_key FROM runs WHERE id = :id"), {"id": run_id}).scalar_one()
    envelope = clean.results.get(result_key)
    auth = {"Authorization": f"Bearer {key}"}
    with private_moto(tmp_path) as moto:
        s3 = boto3.client("s3", region_name=REGION, endpoint_url=moto.url, **CREDS)
        s3.create_bucket(Bucket=settings.s3_result_bucket)
        s3.put_object(Bucket=settings.s3_result_bucket, Key=result_key, Body=envelope)
        with gunicorn({"S3_ENDPOINT_URL": moto.url}, tmp_path / "api.log") as base:
            warm = requests.get(f"{base}/v1/runs/{run_id}/result", headers=auth, timeout=30)
            assert warm.status_code == 200 and warm.content == envelope
            moto.freeze()
            try:
                started = time.monotonic()
                resp = requests.get(f"{base}/v1/runs/{run_id}/result", headers=auth, timeout=40)
                problem = _assert_503(resp, time.monotonic() - started)
                assert "s3" in problem["detail"], problem
            finally:
                moto.thaw()
            assert requests.get(f"{base}/v1/runs/{run_id}/result", headers=auth, timeout=30).status_code == 200
    assert_invariants(clean, [tenant_id])


def test_readyz_names_each_dependency_down_in_turn_and_recovers(settings, tmp_path):
    """Issue 14 item 9: /readyz over HTTP with PostgreSQL, Redis and AWS (SQS and S3)
    each stopped in turn, and PostgreSQL hung: 503 naming exactly that dependency,
    answered within a probe's timeout, and 200 again once it is back."""
    import boto3

    from tests.support.services import CREDS, REGION

    with private_postgres() as pg, private_redis(tmp_path) as rds, private_moto(tmp_path) as moto:
        def aws_up() -> str:
            boto3.client("s3", region_name=REGION, endpoint_url=moto.url, **CREDS).create_bucket(
                Bucket=settings.s3_result_bucket)
            return moto.create_queue(settings.sqs_queue_name)

        queue_url = aws_up()
        env = {"DATABASE_URL": pg.url, "REDIS_URL": rds.url, "SQS_ENDPOINT_URL": moto.url,
               "S3_ENDPOINT_URL": moto.url, "SQS_QUEUE_URL": queue_url}

        def probe() -> tuple[int, set]:
            started = time.monotonic()
            resp = requests.get(f"{base}/readyz", timeout=30)
            assert time.monotonic() - started < 8, (f"within the chart's readinessProbe timeoutSeconds (8): "
                                                     f"{time.monotonic() - started:.1f} s, {resp.text}")
            services = resp.json()["services"]
            down = {name for name, state in services.items()
                    if name not in ("admissions", "tenants_frozen") and state not in ("ok", "skipped")}
            return resp.status_code, down

        def recovered() -> None:
            deadline = time.monotonic() + 30
            while probe() != (200, set()):
                assert time.monotonic() < deadline, probe()
                time.sleep(0.5)

        with gunicorn(env, tmp_path / "api.log") as base:
            assert probe() == (200, set())
            for down, up, named in ((pg.stop, pg.start, {"database"}),
                                    (pg.freeze, pg.thaw, {"database"}),
                                    (rds.stop, rds.start, {"redis"}),
                                    (moto.stop, lambda: (moto.start(), aws_up()), {"sqs", "s3"})):
                down()
                try:
                    assert probe() == (503, named)
                finally:
                    up()
                recovered()
