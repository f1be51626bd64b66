"""Polling for an outcome in tests that drive real processes."""
from __future__ import annotations

import time


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """The first truthy value of `predicate()` within `timeout` seconds, or AssertionError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
