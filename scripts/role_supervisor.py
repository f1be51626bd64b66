"""Keep `make run`'s roles running: one that exits is started again, the others never notice.

A role that dies (beat losing Redis, a worker killed by the OOM killer) used to
take the whole platform down with it. Now it is restarted after a backoff that
doubles with each exit in the window; after `max_restarts` exits within
`window_sec` the supervisor gives up on that role alone and says so, since
restarting a role that can never start only buries the first error in noise.

Standard library only, driven by polling from the caller's loop (no thread), so
a Ctrl-C in the caller stops everything at one place.
"""
from __future__ import annotations

import collections
import signal
import subprocess
import time
from typing import Callable


class Supervisor:
    def __init__(self, start: Callable[[str], subprocess.Popen], *, say: Callable[[str], None],
                 cleanup: Callable[[subprocess.Popen], object] = lambda proc: None,
                 backoff_sec: float = 1.0, backoff_max_sec: float = 15.0,
                 max_restarts: int = 5, window_sec: float = 60.0, clock: Callable[[], float] = time.monotonic):
        """`start(role)` starts a role's process; `cleanup(proc)` ends what is left of a dead
        one's process group (pool processes, gunicorn workers) before it is started again."""
        self._start, self._say, self._cleanup, self._clock = start, say, cleanup, clock
        self.backoff_sec, self.backoff_max_sec = backoff_sec, backoff_max_sec
        self.max_restarts, self.window_sec = max_restarts, window_sec
        self.procs: dict[str, subprocess.Popen] = {}  # the latest process of each role, in start order
        self.given_up: set[str] = set()
        self._exits: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._restart_at: dict[str, float] = {}

    def launch(self, role: str) -> subprocess.Popen:
        self.procs[role] = proc = self._start(role)
        return proc

    def running(self) -> list[str]:
        """Roles still looked after (alive, or waiting for their restart)."""
        return [role for role in self.procs if role not in self.given_up]

    def poll(self) -> None:
        """Notice exits, schedule restarts, start the ones that are due. Never blocks for long."""
        now = self._clock()
        for role, proc in self.procs.items():
            if role in self.given_up or role in self._restart_at or proc.poll() is None:
                continue
            self._cleanup(proc)
            self._exited(role, proc.returncode, now)
        for role, when in list(self._restart_at.items()):
            if now >= when:
                del self._restart_at[role]
                proc = self.launch(role)
                self._say(f"✓ restarted {role} (pid {proc.pid})")

    def _exited(self, role: str, code: int, now: float) -> None:
        exits = self._exits[role]
        exits.append(now)
        while exits and exits[0] <= now - self.window_sec:
            exits.popleft()
        others = ", ".join(r for r in self.running() if r != role) or "no other role"
        how = describe_exit(code)
        if len(exits) > self.max_restarts:
            self.given_up.add(role)
            self._say(f"✗ {role} {how}, {len(exits)} exits within {self.window_sec:g} s: giving up on "
                      f"{role}; {others} keep running (restart the platform to try {role} again)")
            return
        delay = min(self.backoff_max_sec, self.backoff_sec * 2 ** (len(exits) - 1))
        self._restart_at[role] = now + delay
        self._say(f"✗ {role} {how}: restarting it in {delay:g} s (restart {len(exits)} of at most "
                  f"{self.max_restarts} per {self.window_sec:g} s); {others} keep running")


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
