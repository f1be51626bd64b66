#!/usr/bin/env python3
"""`make bench-profile`: where a submission and a run spend their time, by py-spy.

Samples (wall clock: waiting on a socket counts) the gunicorn workers while runs are
submitted at a rate moto does not saturate, then the Celery worker process while it
drains a queue of runs, on the same private services as `make bench`. Prints, per
process role, the share of request/task time spent in each dependency (SQS/S3 via
botocore, PostgreSQL, Redis) and in Python, and the heaviest functions of our own
code; writes the raw stacks to build/profile/ (open them in speedscope or feed them to
flamegraph.pl) and the tables to build/profile/summary.md.

    make bench-profile                  25 submissions/s then 100 GET/s, 10 s each; 150 runs for the worker
    PROFILE_SECONDS=10 PROFILE_RUNS=60 make bench-profile
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import BIN, BUILD, Bench, Progress, open_loop  # noqa: E402  (sets the bench's own services)

OUT = BUILD / "profile"
# 10 s at 25/s leaves 250 messages queued: moto's SendMessage slows as its queue
# deepens, and at 20 s (500 queued) it nears the rate and requests start to queue.
SECONDS = int(os.environ.get("PROFILE_SECONDS", "10"))
RATE = float(os.environ.get("PROFILE_RATE", "25"))
RUNS = int(os.environ.get("PROFILE_RUNS", "150"))

# A sample belongs to the first bucket whose marker appears in its stack (innermost
# first), so a PostgreSQL call made from inside our code counts as PostgreSQL.
BUCKETS = [
    ("SQS/S3 (botocore → moto)", ("botocore/", "s3transfer/")),
    ("PostgreSQL (psycopg2)", ("psycopg2/", "(psycopg2", "do_execute", "do_commit", "do_rollback", "_connect")),
    ("Redis", ("redis/",)),
]
# Frames that say a sample is inside a request (API) or a task (worker); the rest is
# the process waiting for work.
BUSY = {"api": ("handle_request",), "worker": ("trace_task", "fast_trace_task")}


def record(pid: int, seconds: float, path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [BIN / "py-spy", "record", "--pid", str(pid), "--subprocesses", "--idle", "--rate", "200",
         "--duration", str(int(seconds)), "--format", "raw", "--output", str(path), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def parse(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            stacks.append((stack.split(";"), int(count)))
    return stacks


def summarize(role: str, stacks: list[tuple[list[str], int]], title: str | None = None) -> str:
    busy = [(frames, n) for frames, n in stacks if any(m in f for f in frames for m in BUSY[role])]
    total = sum(n for _, n in busy) or 1
    buckets: collections.Counter = collections.Counter()
    ours: collections.Counter = collections.Counter()
    for frames, n in busy:
        joined = ";".join(frames)
        name = next((label for label, markers in BUCKETS if any(m in joined for m in markers)), "Python (ours + libraries)")
        buckets[name] += n
        # Inclusive time of each of our functions (once per sample even when recursive).
        for frame in {f for f in frames if "/dpp/" in f or "(dpp/" in f or "/tasks/" in f}:
            ours[_short(frame)] += n
    lines = [f"### {title or role}: {total} samples inside a {'request' if role == 'api' else 'task'} (200 Hz, wall clock)", "",
             "| where | share |", "|---|---:|"]
    lines += [f"| {label} | {100 * n / total:.1f} % |" for label, n in buckets.most_common()]
    lines += ["", "| our function (inclusive) | share |", "|---|---:|"]
    lines += [f"| `{name}` | {100 * n / total:.1f} % |" for name, n in ours.most_common(15)]
    return "\n".join(lines) + "\n"


def _short(frame: str) -> str:
    # py-spy frames read "function (path/to/file.py:line)": keep function and module.
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    tail = path.split("/dpp/")[-1] if "/dpp/" in path else path.split("/")[-1]
    return f"{tail.removesuffix('.py').replace('/', '.')}.{func}"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    bench = Bench()
    progress = Progress(4)
    try:
        bench.up()
        progress.step("services up")
        api = bench.api()
        for _ in range(20):  # warm the pools and caches before sampling
            api.submit()
        bench.drain_queue()
        spy = record(bench.procs["api"].pid, SECONDS + 1, OUT / "api.raw")
        time.sleep(0.5)
        latencies = open_loop(api.submit, RATE, SECONDS)
        spy.wait(timeout=120)
        bench.drain_queue()
        run_id = api.submit()
        spy = record(bench.procs["api"].pid, SECONDS + 1, OUT / "api-get.raw")
        time.sleep(0.5)
        reads = open_loop(lambda _i: api.status(run_id), 100, SECONDS)
        spy.wait(timeout=120)
        bench.drain_queue()
        progress.step(f"API sampled at {RATE:g} submissions/s, then 100 GET/s, {SECONDS} s each")

        ids = [api.submit() for _ in range(RUNS)]
        bench.worker()
        spy = record(bench.procs["worker"].pid, 600, OUT / "worker.raw")
        deadline = time.monotonic() + 600
        while bench._finished(ids) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.5)
        spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled when interrupted
        spy.wait(timeout=60)
        progress.step(f"worker sampled over {RUNS} runs")
    finally:
        bench.down()
    parts = [summarize("api", parse(OUT / "api.raw")),
             summarize("api", parse(OUT / "api-get.raw"), "api, GET /v1/runs/{id}")]
    if (OUT / "worker.raw").exists():
        parts.append(summarize("worker", parse(OUT / "worker.raw")))
    latencies.sort()
    reads.sort()
    head = (f"Submissions at {RATE:g}/s for {SECONDS} s: p50 {latencies[len(latencies) // 2]:.1f} ms, "
            f"p95 {latencies[int(len(latencies) * 0.95)]:.1f} ms. GET /v1/runs/{{id}} at 100/s: "
            f"p50 {reads[len(reads) // 2]:.1f} ms, p95 {reads[int(len(reads) * 0.95)]:.1f} ms.\n")
    summary = head + "\n" + "\n".join(parts)
    (OUT / "summary.md").write_text(summary)
    progress.step("summary written")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
