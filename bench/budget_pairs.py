"""reserve+settle pairs per second through our Lua scripts (dpp/adapters/budget.py).

    budget_pairs.py REDIS_URL SECONDS PROCESSES   -> prints pairs/s (all processes together)

Each process is one client on one connection, a tenant of its own, one call per
round trip (no pipelining), like redis-benchmark's clients in the baseline.
"""
import multiprocessing
import sys
import time
import uuid


def client(url: str, seconds: float, out) -> None:
    from dpp.adapters.budget import RedisBudget

    budget = RedisBudget.from_url(url)
    tenant = f"bench-{uuid.uuid4().hex[:8]}"
    budget.restore(tenant, 10**15, {})
    pairs, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        run = uuid.uuid4().hex
        budget.reserve(tenant, run, 500_000)
        budget.settle(tenant, run, 5_800)
        pairs += 1
    out.put(pairs)


def main() -> None:
    url, seconds, processes = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    out = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=client, args=(url, seconds, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    total = sum(out.get() for _ in procs)
    for p in procs:
        p.join()
    print(total / seconds)


if __name__ == "__main__":
    main()
