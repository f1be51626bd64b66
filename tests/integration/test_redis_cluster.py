"""The budget gate on a real 3-master Redis Cluster (SPEC §2, issue 5).

"Every key one script touches shares the `{tenant_id}` hash tag, so scripts never
raise CROSSSLOT on a cluster" — checked here for real: a cluster started on loopback
(tests/support/redis_cluster.py), the unchanged `RedisBudget` and `RedisRateLimiter`
built on `redis.cluster.RedisCluster`, tenants chosen so that their slots live on
every one of the three masters, and the same sequence of operations replayed on the
project's single-node test Redis must give identical results and identical final
state. A negative control shows that a cross-slot call really does fail there.
"""
from __future__ import annotations

import types

import pytest
import redis
from redis.cluster import RedisCluster, key_slot
from redis.exceptions import ClusterCrossSlotError, RedisClusterException, ResponseError

import dpp.adapters.budget as budget_module
import dpp.adapters.ratelimit as ratelimit_module
from dpp.adapters.budget import RedisBudget, balance_key, receipt_key, reserve_key
from dpp.adapters.ratelimit import RedisRateLimiter
from tests.support.redis_cluster import HASH_SLOTS, devstack, redis_cluster

MASTERS = 3
FROZEN_MS = 1_700_000_000_123  # one clock for both backends: receipts compare exactly


# ------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Fails (ClusterError) rather than skips when the cluster cannot be formed.
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster"), masters=MASTERS) as running:
        assert 6379 not in running.ports
        yield running


@pytest.fixture(scope="module")
def cluster_client(cluster):
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    yield client
    client.close()


@pytest.fixture
def flushed_cluster(cluster_client):
    cluster_client.flushall()  # FLUSHALL goes to every primary
    cluster_client.script_flush()
    return cluster_client


@pytest.fixture(scope="module")
def tenants(cluster):
    """Tenant ids whose `{tenant}` slot is served by each master in turn (two per master)."""
    owners = cluster.slot_ranges()
    by_master: dict[int, list[str]] = {port: [] for port in cluster.ports}
    for i in range(1000):
        tenant = f"t-cl-{i}"
        port = next(p for first, last, p in owners if first <= key_slot(tenant.encode()) <= last)
        if len(by_master[port]) < 2:
            by_master[port].append(tenant)
        if all(len(v) == 2 for v in by_master.values()):
            break
    chosen = [t for pair in zip(*by_master.values()) for t in pair]
    return chosen


@pytest.fixture
def frozen_clock(monkeypatch):
    """The budget's `now` and the rate limiter's clock fixed, for byte-equal comparisons."""
    monkeypatch.setattr(budget_module, "_now_ms", lambda: FROZEN_MS)
    monkeypatch.setattr(ratelimit_module, "time", types.SimpleNamespace(time=lambda: FROZEN_MS / 1000))


# ------------------------------------------------------------------------ helpers

def _is_crossslot(exc: BaseException) -> bool:
    """Any form a cross-slot refusal takes with redis-py 8.

    Server side, "CROSSSLOT Keys in request don't hash to the same slot" becomes a
    `ClusterCrossSlotError` (a ResponseError) whose message has lost the CROSSSLOT
    word: it is kept in `status_code`, so `'CROSSSLOT' in str(exc)` alone misses it.
    The cluster client may refuse before sending: RedisClusterException
    "... must map to the same (key) slot".
    """
    text = str(exc)
    return (
        isinstance(exc, ClusterCrossSlotError)
        or getattr(exc, "status_code", None) == "CROSSSLOT"
        or "CROSSSLOT" in text
        or (isinstance(exc, RedisClusterException) and "same" in text and "slot" in text)
    )


def _outcome(label: str, call):
    """The call's result, or the name of the exception it raised (a result too: BudgetMissing…).

    A CROSSSLOT error, from the server or from redis-py, fails the test on the spot.
    """
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - recorded, compared between the backends
        if _is_crossslot(exc):
            pytest.fail(f"{label}: CROSSSLOT on the cluster: {exc!r}", pytrace=False)
        if isinstance(exc, (redis.RedisError, RedisClusterException)):
            raise  # a Redis failure is never an expected outcome
        return ("raised", type(exc).__name__)


def _scenario(budget: RedisBudget, limiter: RedisRateLimiter, tenant: str, scale: int) -> list:
    """Every script, in the order SPEC §2 describes; a transcript."""
    b, t = budget, tenant
    steps = [
        ("reserve before any credit", lambda: b.reserve(t, "r0", 1)),
        ("credit finds no balance", lambda: b.credit(t, 1_000 * scale)),
        ("debit finds no balance", lambda: b.debit(t, 1_000 * scale)),
        ("restore sets a missing balance", lambda: b.restore(t, 1_000 * scale, {})),
        ("credit increments", lambda: b.credit(t, 500 * scale)),
        ("reserve ok", lambda: b.reserve(t, "r1", 300 * scale)),
        ("reserve insufficient", lambda: b.reserve(t, "r2", 5_000 * scale)),
        ("reserve the same run twice", lambda: b.reserve(t, "r1", 300 * scale)),
        ("settle", lambda: b.settle(t, "r1", 120 * scale)),
        ("settle replay", lambda: b.settle(t, "r1", 999 * scale)),
        ("reserve a settled run", lambda: b.reserve(t, "r1", 300 * scale)),
        ("settle without hold", lambda: b.settle(t, "ghost", 50)),
        ("reserve for release", lambda: b.reserve(t, "r3", 400 * scale)),
        ("release", lambda: b.release(t, "r3")),
        ("release twice", lambda: b.release(t, "r3")),
        ("reserve before restore", lambda: b.reserve(t, "r4", 250 * scale)),
        ("available before restore", lambda: b.available(t)),
        ("restore (one script over one tag)",
         lambda: b.restore(t, 1_000 * scale, {"r1": 300 * scale, "r4": 250 * scale, "r5": 100 * scale})),
        ("available after restore", lambda: b.available(t)),
        ("restored hold r4", lambda: b.reservation(t, "r4")),
        ("restored hold r5", lambda: b.reservation(t, "r5")),
        ("settle a restored hold, partly", lambda: b.settle(t, "r5", 40 * scale)),
        ("settle a restored hold, fully", lambda: b.settle(t, "r4", 10_000 * scale)),
        ("reserve left in flight", lambda: b.reserve(t, "r6", 10 * scale)),
        ("receipt r1", lambda: b.receipt(t, "r1")),
        ("receipt r4", lambda: b.receipt(t, "r4")),
        ("receipt r5", lambda: b.receipt(t, "r5")),
        ("no receipt for a released run", lambda: b.receipt(t, "r3")),
        ("credit after all that", lambda: b.credit(t, 7)),
        ("debit after all that", lambda: b.debit(t, 3)),
        ("final available", lambda: b.available(t)),
    ]
    steps += [(f"rate limit runs #{i}", lambda: limiter.hit(t, "runs", 60)) for i in range(1, 6)]
    steps += [(f"rate limit submit #{i}", lambda: limiter.hit(t, "submit", 30)) for i in range(1, 3)]
    return [(label, _outcome(label, call)) for label, call in steps]


def _state(client, tenant: str) -> dict:
    """Every key of the tenant: its type, value, and whether it expires."""
    found = {}
    for key in client.scan_iter(match=f"*{{{tenant}}}*", count=1000):
        key = key.decode()
        kind = client.type(key).decode()
        value = {"string": client.get, "hash": client.hgetall, "set": client.smembers}[kind](key)
        found[key] = (kind, value, client.ttl(key) > 0)
    return found


# ------------------------------------------------------------------------ the cluster itself

def test_the_cluster_has_three_masters_sharing_every_slot(cluster, cluster_client):
    ranges = cluster.slot_ranges()
    assert {port for _, _, port in ranges} == set(cluster.ports) and len(cluster.ports) == MASTERS
    covered = sorted(slot for first, last, _ in ranges for slot in (first, last))
    assert covered[0] == 0 and covered[-1] == HASH_SLOTS - 1
    assert sum(last - first + 1 for first, last, _ in ranges) == HASH_SLOTS
    assert len(cluster_client.get_primaries()) == MASTERS and not cluster_client.get_replicas()
    for port in cluster.ports:
        with cluster.node(port) as node:
            assert node.execute_command("CLUSTER INFO")["cluster_state"] == "ok"


def test_the_tenants_spread_over_every_master(cluster, cluster_client, tenants):
    assert len(tenants) >= MASTERS
    masters = {cluster.slot_owner(key_slot(t.encode())) for t in tenants}
    assert masters == set(cluster.ports)
    for tenant in tenants:
        slot = cluster_client.keyslot(f"{{{tenant}}}")
        assert slot == key_slot(tenant.encode())
        keys = [balance_key(tenant), reserve_key(tenant, "r1"), receipt_key(tenant, "r1"),
                f"ratelimit:{{{tenant}}}:runs:0"]
        assert {cluster_client.keyslot(k) for k in keys} == {slot}


# ------------------------------------------------------------------------ same results as one node

def test_every_script_gives_the_same_results_on_the_cluster_as_on_one_node(
        clean, flushed_cluster, cluster, tenants, frozen_clock):
    single_budget, single_limiter = clean.budget, clean.rate_limiter
    assert not isinstance(single_budget.client, RedisCluster)
    cluster_budget = RedisBudget(flushed_cluster)
    cluster_limiter = RedisRateLimiter(flushed_cluster)

    for scale, tenant in enumerate(tenants, start=1):
        on_cluster = _scenario(cluster_budget, cluster_limiter, tenant, scale)
        on_single = _scenario(single_budget, single_limiter, tenant, scale)
        assert on_cluster == on_single, tenant

        # The scenario is not vacuous: the outcomes are the ones SPEC §2 describes.
        got = dict(on_cluster)
        assert got["reserve before any credit"] == ("raised", "BudgetMissing")
        assert got["credit finds no balance"] is None and got["credit increments"] == 1_500 * scale
        assert got["debit finds no balance"] is None
        assert got["debit after all that"] == got["credit after all that"] - 3 == got["final available"]
        assert got["reserve ok"].ok and not got["reserve insufficient"].ok
        assert got["reserve the same run twice"] == got["reserve ok"]
        assert got["settle replay"].replayed and not got["settle"].replayed
        assert got["reserve a settled run"] == ("raised", "AlreadySettled")
        assert got["settle without hold"].reservation_missing
        assert (got["release"], got["release twice"]) == (400 * scale, 0)
        # r1 was settled in Redis (its receipt): no hold again, its release counts.
        assert got["available after restore"] == 1_000 * scale + 180 * scale
        assert (got["restored hold r4"], got["restored hold r5"]) == (250 * scale, 100 * scale)
        assert got["final available"] == 1_000 * scale + 180 * scale + 60 * scale - 10 * scale + 7 - 3
        assert [got[f"rate limit runs #{i}"].position for i in range(1, 6)] == [1, 2, 3, 4, 5]

        # Identical final state, key by key (balances, holds, receipts, counters).
        cluster_state, single_state = _state(flushed_cluster, tenant), _state(single_budget.client, tenant)
        assert cluster_state == single_state, tenant
        assert cluster_budget.available(tenant) == single_budget.available(tenant)

    # The in-flight holds, read from each tenant's holds set, are the same.
    cluster_holds = sorted(h for t in tenants for h in cluster_budget.holds(t))
    assert cluster_holds == sorted(h for t in tenants for h in single_budget.holds(t))
    assert len(cluster_holds) == len(tenants)

    # And the keys really live on the master that serves their slot, on all three.
    per_master = {port: 0 for port in cluster.ports}
    for tenant in tenants:
        owner = cluster.slot_owner(key_slot(tenant.encode()))
        with cluster.node(owner) as node:
            assert node.exists(balance_key(tenant)) == 1
        per_master[owner] += 1
    assert all(per_master.values()), per_master
    for port in cluster.ports:
        with cluster.node(port) as node:
            assert node.dbsize() > 0


def test_restore_is_one_script_the_cluster_accepts(flushed_cluster, cluster, tenants):
    budget = RedisBudget(flushed_cluster)
    for tenant in tenants:
        budget.restore(tenant, 4_200, {"a": 10, "b": 20})
        assert budget.available(tenant) == 4_200
        assert (budget.reservation(tenant, "a"), budget.reservation(tenant, "b")) == (10, 20)
        assert budget.settle(tenant, "b", 5).release_micros == 15 and budget.available(tenant) == 4_215
    # Contrast: a MULTI over two tenants' keys is refused, so restore's success
    # above is the one-tag design working, not the cluster being lenient.
    a, b = tenants[0], tenants[1]
    assert cluster.slot_owner(key_slot(a.encode())) != cluster.slot_owner(key_slot(b.encode()))
    pipe = flushed_cluster.pipeline(transaction=True)
    pipe.set(balance_key(a), 1)
    with pytest.raises((RedisClusterException, ResponseError)) as refused:
        pipe.set(balance_key(b), 1)
        pipe.execute()
    assert _is_crossslot(refused.value), repr(refused.value)


def test_scripts_reload_on_every_master_after_a_script_flush(flushed_cluster, tenants):
    budget, limiter = RedisBudget(flushed_cluster), RedisRateLimiter(flushed_cluster)
    for tenant in tenants:
        budget.restore(tenant, 100, {})
    flushed_cluster.script_flush()  # every primary forgets every script
    for tenant in tenants:
        assert budget.reserve(tenant, "r1", 60).ok
        assert budget.settle(tenant, "r1", 10).release_micros == 50
        assert budget.release(tenant, "r1") == 0
        assert limiter.hit(tenant, "runs", 60).position == 1
        assert budget.available(tenant) == 90


# ------------------------------------------------------------------------ negative control

def test_a_cross_slot_eval_does_raise_crossslot_on_this_cluster(flushed_cluster, cluster, tenants):
    """Proves the checks above can fail: keys of two tags in one EVAL are refused."""
    a, b = tenants[0], tenants[1]
    keys = [balance_key(a), balance_key(b)]
    assert key_slot(keys[0].encode()) != key_slot(keys[1].encode())
    script = "return redis.call('MGET', KEYS[1], KEYS[2])"

    # Sent to the node serving the first key: the server itself answers CROSSSLOT.
    owner = cluster.slot_owner(key_slot(keys[0].encode()))
    target = flushed_cluster.get_node(host="127.0.0.1", port=owner)
    with pytest.raises(ResponseError) as answered:
        flushed_cluster.execute_command("EVAL", script, 2, *keys, target_nodes=target)
    assert isinstance(answered.value, ClusterCrossSlotError), repr(answered.value)
    assert answered.value.status_code == "CROSSSLOT" and _is_crossslot(answered.value)
    with cluster.node(owner) as node, pytest.raises(ClusterCrossSlotError) as answered:
        node.eval(script, 2, *keys)
    assert answered.value.status_code == "CROSSSLOT"
    # Without redis-py's parsing: the raw reply starts with the CROSSSLOT code.
    with pytest.raises(Exception, match=r"^CROSSSLOT "):
        devstack.redis_command(f"redis://127.0.0.1:{owner}/0", "EVAL", script, 2, *keys)
    with pytest.raises(pytest.fail.Exception, match="CROSSSLOT"):
        _outcome("cross-slot EVAL on one node", lambda: flushed_cluster.execute_command(
            "EVAL", script, 2, *keys, target_nodes=target))

    # Through the cluster client as the product calls it (a registered Script):
    # redis-py refuses before sending. `_outcome` flags both forms as CROSSSLOT.
    with pytest.raises(RedisClusterException) as refused:
        flushed_cluster.register_script(script)(keys=keys)
    assert _is_crossslot(refused.value)
    with pytest.raises(pytest.fail.Exception, match="CROSSSLOT"):
        _outcome("cross-slot EVAL", lambda: flushed_cluster.eval(script, 2, *keys))
