"""The worker's heartbeat: keep the lease and the SQS message alive while a pack runs.

Every tick extends two clocks that would otherwise hand the run to someone else:
- the database lease (`lease_expires_at`), by compare-and-set conditioned on
  this worker's `lease_token`, PROCESSING and no finalize claim, in a session
  of its own (a tick never shares a transaction with the pack's progress);
- the SQS message's visibility timeout, through the receipt handle, so SQS
  does not redeliver the message to another worker mid-run.

If the compare-and-set matches nothing the lease is lost: the tick sets
`lost`, the pack is stopped at its next progress report, and the worker must
not finalize. The heartbeat is stopped *before* finalize: a tick racing the
finalize CLAIM would only lose (the claim bumps the version), but a tick that
outlived the worker's decision would keep extending a lease nobody uses.
"""
from __future__ import annotations

import logging
import threading
import time

from dpp import metrics
from dpp.adapters.repository import RunRepository, snapshot
from dpp.domain import runs as machine
from dpp.domain.errors import InvalidTransition

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, deps, run_id: str, lease_token: str, message=None):
        self.deps = deps
        self.run_id = run_id
        self.lease_token = lease_token
        self.message = message  # (queue_url, receipt_handle) or None outside SQS
        self.interval = deps.settings.worker_heartbeat_interval_sec
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{run_id[:8]}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.beat():
                    self.lost.set()
                    log.warning("lease lost", extra={"run_id": self.run_id})
                    return
            except Exception:  # a failed tick is retried; the lease TTL covers a few misses
                log.warning("heartbeat tick failed", extra={"run_id": self.run_id}, exc_info=True)

    def beat(self) -> bool:
        """One tick. False when the lease is no longer this worker's."""
        ttl = self.deps.settings.worker_lease_ttl_sec
        with self.deps.db.transaction() as session:
            repo = RunRepository(session)
            row, now = repo.get_with_now(self.run_id)
            snap = snapshot(row)
            try:
                changes = machine.extend_lease(snap, token=self.lease_token, now=now, ttl_sec=ttl)
            except InvalidTransition:
                return False
            if not repo.apply(snap, changes):
                return False
        if self.message is not None:
            queue_url, receipt_handle = self.message
            # The message stays invisible for as long as the lease runs, and a bit.
            self.deps.sqs.extend_visibility(queue_url, receipt_handle, ttl + self.interval)
        metrics.WORKER_HEARTBEAT.set(time.time())
        return True
