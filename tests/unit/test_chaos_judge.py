"""The chaos runner's judge: what counts as a failed trial and a failed run (no services)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import chaos  # noqa: E402


def outcome(**kw):
    base = dict(point="worker_sigkill", runs=1, fault_times=[1.0])
    return chaos.Outcome(**{**base, **kw})


def test_a_trial_fails_on_any_money_error_an_unfired_fault_or_no_run():
    assert not outcome().failed
    for bad in (dict(leaks=1), dict(double_charges=1), dict(stuck=1), dict(fired=False), dict(runs=0)):
        assert outcome(**bad).failed, bad


def test_the_report_counts_unfired_faults_empty_trials_and_the_final_judgement():
    report = chaos.build_report(
        {"worker_sigkill": [outcome(), outcome(fired=False)], "a+b": [outcome(point="a+b", runs=0)]},
        {}, {"leaks": 1, "double_charges": 0, "stuck": 2, "tenants": 5},
    )
    assert (report["unfired"], report["empty_trials"], report["trials_overlapping"]) == (1, 1, 1)
    assert (report["leaks"], report["stuck"]) == (1, 2)  # the final judgement of every tenant counts


def test_every_point_has_a_bound_and_a_pair_waits_for_the_slower_plus_a_restart():
    for point in chaos.ALL:
        assert chaos.bound(point) > 0
    a, b = "redis_restart_without_data", "worker_sigkill"
    assert chaos.bound(f"{a}+{b}") == max(chaos.bound(a), chaos.bound(b)) + chaos.RESTART_SEC
    assert set(p for pair in chaos.PAIRS for p in pair.split("+")) <= set(chaos.ALL)
