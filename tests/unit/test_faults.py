"""Fault tokens (dpp/faults.py): one firing each, and a scoped one only for its tenant.

Under other tenants' traffic an unscoped `after_reserve` token was taken by a load
agent's submission: the orphan landed on a tenant the trial did not watch, and the
trial's orphan-sweep token waited for an orphan of its own that never came (3
unfired trials of 15 at d65c299). Each check runs in a child process, since a
point that fires SIGKILLs whoever reaches it.
"""
import os
import signal
import subprocess
import sys

from dpp import faults


def reach(tokens: str, point: str, *scopes: str) -> int:
    code = f"from dpp.faults import fault_point; fault_point({point!r}, *{scopes!r})"
    env = {**os.environ, "DPP_FAULT_TOKENS": tokens}
    env.pop("DPP_FAULTS", None)
    return subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode


def test_a_scoped_token_is_taken_only_where_its_tenant_passes(tmp_path):
    token = faults.arm(str(tmp_path), "after_reserve", scope="tenant-a")
    assert reach(str(tmp_path), "after_reserve", "tenant-b") == 0
    assert reach(str(tmp_path), "after_reserve") == 0  # a point that names no tenant
    assert os.path.exists(token)
    assert reach(str(tmp_path), "after_reserve", "tenant-b", "tenant-a") == -signal.SIGKILL  # a batch holding it
    assert not os.path.exists(token)
    assert reach(str(tmp_path), "after_reserve", "tenant-a") == 0  # once


def test_no_tenant_id_is_a_prefix_of_another_tenants_tag(tmp_path):
    faults.arm(str(tmp_path), "mid_pack", scope="t.1")
    assert reach(str(tmp_path), "mid_pack", "t") == 0
    assert reach(str(tmp_path), "mid_pack", "t.1") == -signal.SIGKILL


def test_an_unscoped_token_is_taken_by_any_tenant_once(tmp_path):
    faults.arm(str(tmp_path), "after_lease_claim")
    assert reach(str(tmp_path), "after_lease_claim", "anyone") == -signal.SIGKILL
    assert reach(str(tmp_path), "after_lease_claim", "anyone") == 0
    assert os.listdir(tmp_path) == []
