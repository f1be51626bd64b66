"""Redis Cluster failures over HTTP: MOVED and CLUSTERDOWN answer 503, nothing held (issue 14).

A private 3-master cluster on loopback (tests/support/redis_cluster.py), never the
shared Redis. The API is pointed at it two ways:
- as one node (`DPP_REDIS_CLUSTER` unset), for a tenant whose slot another master
  serves: every budget call is answered MOVED;
- as a cluster, after one master died: its tenants' calls fail to connect, and once
  the cluster marks the node failed every master answers CLUSTERDOWN.
Each is a 503 with Retry-After, and the ledger shows nothing reserved.
"""
from __future__ import annotations

import dataclasses
import time
import uuid

import requests
from redis.cluster import key_slot

from tests.conftest import assert_invariants
from tests.e2e.test_dependency_failures import TOPUP, _assert_503, _books, _post
from tests.support.redis_cluster import redis_cluster
from tests.support.services import devstack, gunicorn


def _tenant_on(deps, cluster, port: int) -> tuple[str, str]:
    """A new tenant whose `{tenant}` slot the master on `port` serves, topped up through `deps`."""
    from dpp.adapters.budget import balance_key
    from dpp.services import ledger, tenants

    while True:
        tenant_id = f"t-cl-{uuid.uuid4().hex[:8]}"
        if cluster.slot_owner(key_slot(balance_key(tenant_id).encode())) == port:
            break
    tenants.create_tenant(deps, tenant_id, "pro")
    key = tenants.issue_key(deps, tenant_id)
    ledger.topup(deps, tenant_id, TOPUP)
    return tenant_id, key


def _nothing_reserved(deps, tenant_id: str) -> None:
    books, runs, transfers = _books(deps, tenant_id)
    assert runs == [] and (books.available, books.held) == (TOPUP, 0), (books, runs)
    assert [kind for _, kind, _ in transfers] == ["TOPUP"]


def test_moved_and_clusterdown_answer_503_and_reserve_nothing(clean, settings, tmp_path):
    from dpp.bootstrap import Deps

    with redis_cluster(tmp_path / "cluster") as cluster:
        first, _, victim = cluster.ports
        url = f"redis://127.0.0.1:{first}/0"
        deps = Deps(dataclasses.replace(settings, redis_url=url, redis_cluster=True))
        elsewhere, elsewhere_key = _tenant_on(deps, cluster, victim)
        here, here_key = _tenant_on(deps, cluster, first)

        # One node, not a cluster client: the tenant's keys live on another master.
        with gunicorn({"REDIS_URL": url, "DPP_REDIS_CLUSTER": "0"}, tmp_path / "api-node.log") as base:
            resp, elapsed = _post(base, elsewhere_key, "moved-1")
            problem = _assert_503(resp, elapsed)
            assert "redis" in problem["detail"], problem
        _nothing_reserved(deps, elsewhere)

        with gunicorn({"REDIS_URL": url, "DPP_REDIS_CLUSTER": "1"}, tmp_path / "api-cluster.log") as base:
            for key in (elsewhere_key, here_key):  # the cluster client knows every master
                auth = {"Authorization": f"Bearer {key}"}
                assert requests.get(f"{base}/v1/balance", headers=auth, timeout=10).status_code == 200
            devstack.stop_process(cluster.procs[cluster.ports.index(victim)])
            with cluster.node(first) as node:  # the survivors mark it failed after node_timeout
                deadline = time.monotonic() + 30
                while "fail" not in str(node.execute_command("CLUSTER INFO").get("cluster_state")):
                    assert time.monotonic() < deadline, "the cluster never noticed its master died"
                    time.sleep(0.2)
            for tenant_id, key in ((elsewhere, elsewhere_key), (here, here_key)):
                resp, elapsed = _post(base, key, f"down-{tenant_id}")
                problem = _assert_503(resp, elapsed)
                assert "redis" in problem["detail"], problem
                _nothing_reserved(deps, tenant_id)

        # The surviving master still has the mirror of its tenant, untouched.
        from dpp.adapters.budget import balance_key, holds_key

        with cluster.node(first) as node:
            node.config_set("cluster-allow-reads-when-down", "yes")
            assert int(node.get(balance_key(here))) == TOPUP
            assert node.scard(holds_key(here)) == 0
        assert_invariants(clean, [here, elsewhere], check_redis=False)  # the ledger's half; Redis above
