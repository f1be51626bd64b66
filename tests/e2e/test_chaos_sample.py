"""A sample of the chaos run inside `make test`: one trial of every fault point.

The full run (`make chaos`, 30 trials per point) is committed as
docs/chaos-report.json; this keeps every point exercised on every change.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_one_trial_of_every_fault_point_loses_no_money(tmp_path):
    report_path = tmp_path / "chaos-report.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chaos.py"), "--trials", "1", "--report", str(report_path)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert report_path.exists(), run.stderr[-4000:]
    report = json.loads(report_path.read_text())
    sys.path.insert(0, str(ROOT / "scripts"))
    import chaos

    assert {fp["name"] for fp in report["fault_points"]} == set(chaos.ALL)
    assert all(fp["faults_fired"] == fp["trials"] == 1 for fp in report["fault_points"]), run.stdout
    assert (report["leaks"], report["double_charges"], report["stuck"]) == (0, 0, 0), run.stdout + run.stderr[-4000:]
    assert run.returncode == 0
