"""A bounded sample of the chaos run inside `make test` (issue 13: the proof on every commit).

Every fault point once on its own, one trial under multi-tenant load and one
trial that overlaps two faults; the run ends with a quiescent judgement of every
tenant. Any leak, double charge, stuck run, unfired fault or trial without a run
fails CI. The full run (`make chaos`) is committed as docs/chaos-report.json.

The runner owns private PostgreSQL, Redis and moto: on a timeout it is sent
SIGTERM, which stops everything it started, before anything is killed.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_SEC = 600


def run_chaos(args, report_path):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "chaos.py"), *args, "--report", str(report_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_SEC)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the runner stops its services and processes
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        raise AssertionError(f"chaos sample exceeded {TIMEOUT_SEC} s:\n{out[-3000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


def test_every_fault_point_once_plus_load_and_overlap_loses_no_money(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import chaos

    report_path = tmp_path / "chaos-report.json"
    code, out, err = run_chaos(
        ["--trials", "1", "--load-points", "worker_sigkill", "--load-trials", "1", "--load", "2x2",
         "--pairs", "redis_restart_without_data+worker_sigkill", "--pair-trials", "1"], report_path)
    assert report_path.exists(), err[-4000:]
    report = json.loads(report_path.read_text())
    names = {fp["name"] for fp in report["fault_points"]}
    assert set(chaos.ALL) | {"redis_restart_without_data+worker_sigkill"} <= names
    assert report["trials_under_load"] >= 1 and report["trials_overlapping"] >= 1
    assert report["unfired"] == 0 and report["empty_trials"] == 0, out
    assert (report["leaks"], report["double_charges"], report["stuck"]) == (0, 0, 0), out + err[-4000:]
    assert report["final_judgement"]["tenants"] >= len(chaos.ALL) + 2
    assert code == 0


def _running(needle: str) -> list:
    out = subprocess.run(["pgrep", "-af", needle], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_a_chaos_run_stopped_by_sigterm_leaves_no_process_behind():
    """A CI timeout sends SIGTERM: the runner must stop the platform and the Redis,
    moto and PostgreSQL it started before it exits, mid-trial or not."""
    import re
    import time

    pg_data = str(ROOT / ".local" / "pg" / "data")
    pg_before = bool(_running(pg_data))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "chaos.py"), "--trials", "1", "--points", "worker_sigkill",
         "--load-trials", "0", "--pair-trials", "0", "--report", "/dev/null"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
    )
    run_dir, seen = None, []
    deadline = time.monotonic() + 180
    while run_dir is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        found = re.search(r"logs in (\S+)", line)
        if found:
            run_dir = found.group(1)
    assert run_dir, "".join(seen[-20:])
    assert _running(run_dir), "the runner's Redis and beat run with its directory in their command line"
    time.sleep(3)  # mid-trial
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the runner did not stop within 120 s of SIGTERM")
    time.sleep(1)
    assert _running(run_dir) == []
    if not pg_before:
        assert _running(pg_data) == []
