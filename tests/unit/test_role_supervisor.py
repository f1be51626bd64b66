"""`make run`'s supervisor (scripts/role_supervisor.py) on real short-lived processes.

No services: the roles are `python -c` one-liners. A role that keeps exiting is
restarted with a growing backoff, then given up on alone; the others keep running.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import devstack  # noqa: E402
from role_supervisor import Supervisor  # noqa: E402

ROLES = {
    "beat": [sys.executable, "-c", "import sys; sys.exit(1)"],
    "api": [sys.executable, "-c", "import time; time.sleep(60)"],
}


class Roles:
    """Starts the roles as `make run` does (own process group), records every start."""

    def __init__(self, commands: dict):
        self.commands, self.starts = commands, []

    def start(self, role: str) -> subprocess.Popen:
        proc = devstack.start_process(self.commands[role], log_path=None)
        proc.stdout.close()
        self.starts.append((role, proc, time.monotonic()))
        return proc

    def started(self, role: str) -> list:
        return [(proc, at) for name, proc, at in self.starts if name == role]


@pytest.fixture
def supervised():
    roles, said = Roles(ROLES), []
    supervisor = Supervisor(roles.start, say=said.append, cleanup=devstack.stop_process,
                            backoff_sec=0.1, backoff_max_sec=0.4, max_restarts=3, window_sec=60)
    for role in ROLES:
        supervisor.launch(role)
    try:
        yield supervisor, roles, said
    finally:
        devstack.stop_processes(list(supervisor.procs.values()))


def poll_until(supervisor: Supervisor, done, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the supervisor did not get there in time"
        supervisor.poll()
        time.sleep(0.02)


def test_a_dying_role_is_restarted_with_backoff_then_given_up_on_alone(supervised):
    supervisor, roles, said = supervised
    poll_until(supervisor, lambda: "beat" in supervisor.given_up)

    # Started once, restarted max_restarts times, each restart later than the one before.
    starts = roles.started("beat")
    assert len(starts) == 1 + 3
    gaps = [later - earlier for (_, earlier), (_, later) in zip(starts, starts[1:])]
    assert gaps == sorted(gaps) and gaps[0] >= 0.1 and gaps[-1] >= 0.4, gaps

    # The operator is told which role died, with which code, and what happens next.
    died = [line for line in said if line.startswith("✗ beat exited with code 1")]
    assert len(died) == 4, said
    assert "restarting it in 0.1 s" in died[0] and "api keep running" in died[0], died
    assert sum(line.startswith("✓ restarted beat (pid ") for line in said) == 3, said
    assert "giving up on beat" in died[-1] and "api keep running" in died[-1], died

    # The other role never noticed: its first process still runs, never restarted.
    (api, _), = roles.started("api")
    assert api.poll() is None and supervisor.procs["api"] is api
    assert supervisor.running() == ["api"]
    # Given up means given up: no further start, however long it is polled.
    for _ in range(20):
        supervisor.poll()
        time.sleep(0.02)
    assert len(roles.started("beat")) == 4


def test_a_role_killed_by_a_signal_is_named_by_its_signal_and_restarted(supervised):
    supervisor, roles, said = supervised
    (api, _), = roles.started("api")
    devstack.stop_process(api)  # SIGTERM to its group, as an OOM kill or an operator would
    poll_until(supervisor, lambda: len(roles.started("api")) == 2)
    assert any(line.startswith("✗ api was killed by SIGTERM: restarting it") for line in said), said
    assert supervisor.procs["api"].poll() is None and supervisor.procs["api"] is not api
