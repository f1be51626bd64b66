"""Execute one run on a worker (task `dpp.execute_run`, SPEC §3 "Worker").

Delivery is at least once: every step first asks whether it is still this
worker's to take, and a message that is not is acknowledged and dropped.
"""
from __future__ import annotations

import logging
import time
import uuid

from dpp import telemetry
from dpp.adapters.repository import RunRepository, snapshot
from dpp.domain import runs as machine
from dpp.domain.errors import InvalidTransition, LeaseLost, PackFailed
from dpp.domain.packs.base import time_limits
from dpp.domain.runs import ErrorCode
from dpp.faults import fault_point
from dpp.services import finalize
from dpp.services.heartbeat import Heartbeat

log = logging.getLogger(__name__)

PROGRESS_MIN_INTERVAL_SEC = 1.0
LEASE_LOST = "lease-lost"


def execute_run(deps, run_id: str, message: tuple[str, str] | None = None,
                timed_out: tuple[type[BaseException], ...] = ()) -> str:
    """Run it if it is ours to run; return what happened, for the task's result and logs.

    `message` is the SQS (queue_url, receipt_handle) the heartbeat keeps invisible.
    """
    with telemetry.bind(run_id=run_id):
        return _execute_run(deps, run_id, message, timed_out)


def _execute_run(deps, run_id: str, message: tuple[str, str] | None, timed_out: tuple) -> str:
    token, row = _claim_lease(deps, run_id)
    if not token.startswith("lease:"):
        log.info("message dropped", extra={"run_id": run_id, "reason": token})
        return token
    lease_token = token.removeprefix("lease:")
    fault_point("after_lease_claim", row.tenant_id)

    # The row as the claim read it: what a run is (pack, inputs, tenant) never changes.
    with telemetry.run_scope("dpp.execute_run", row.trace_id, run_id, row.tenant_id):
        log.info("run started", extra={"pack_type": row.pack_type})
        return _run_pack(deps, run_id, row.tenant_id, lease_token, deps.packs.get(row.pack_type), row.inputs,
                         message, timed_out)


def _run_pack(deps, run_id: str, tenant_id: str, lease_token: str, pack, inputs, message, timed_out) -> str:
    heartbeat = Heartbeat(deps, run_id, lease_token, message)
    try:
        with heartbeat:
            result = pack.run(inputs, _progress_writer(deps, run_id, tenant_id, lease_token, heartbeat, timed_out))
    except PackStopped:
        log.warning("pack stopped: lease lost", extra={"run_id": run_id})
        return LEASE_LOST
    except Exception as exc:  # the pack's failure is the run's, not the worker's
        if isinstance(exc, timed_out):  # the worker's soft time limit, raised into the pack
            code, message = ErrorCode.PACK_TIMEOUT, f"the pack ran past its time limit of {time_limits(pack)[0]:g} s"
        else:
            code, message = _failure(exc)
        log.warning("pack failed", extra={"run_id": run_id, "error": repr(exc), "error_code": code.value},
                    exc_info=code is not ErrorCode.PACK_TIMEOUT)
        try:
            outcome = finalize.fail_started(deps, run_id, lease_token, code, message)
        except LeaseLost as lost:
            log.warning("lease lost before finalize", extra={"run_id": run_id, "error": str(lost)})
            return LEASE_LOST
        return f"failed:{outcome.charge_micros}"

    # The heartbeat has stopped (the `with` above) before anything finalizes.
    if heartbeat.lost.is_set():
        return LEASE_LOST
    try:
        outcome = finalize.complete(deps, run_id, lease_token, result)
    except LeaseLost as lost:
        # The lease expired or another worker took over: the sweeps end this run.
        log.warning("lease lost before finalize", extra={"run_id": run_id, "error": str(lost)})
        return LEASE_LOST
    return f"completed:{outcome.charge_micros}"


def _claim_lease(deps, run_id: str) -> tuple[str, object]:
    """("lease:<token>", the run row) when this worker now holds the run, else (why not, None)."""
    with deps.db.transaction() as session:
        repo = RunRepository(session)
        row, now = repo.get_with_now(run_id)
        if row is None:
            return "unknown-run", None
        snap = snapshot(row)
        if snap.status.terminal:
            return "duplicate:terminal", None
        if machine.lease_live(snap, now):
            return "duplicate:leased", None
        token = str(uuid.uuid4())
        try:
            changes = machine.claim_lease(snap, token=token, now=now, ttl_sec=deps.settings.worker_lease_ttl_sec)
        except InvalidTransition as exc:
            return f"not-claimable:{exc}", None
        if not repo.apply(snap, changes):
            return "lost-claim-race", None
        return f"lease:{token}", row


def _failure(exc: Exception) -> tuple[ErrorCode, str]:
    """The run's error: a pack's named failure (`PackFailed`) when its code is known, else PACK_ERROR."""
    if isinstance(exc, PackFailed):
        try:
            return ErrorCode(exc.code), str(exc)
        except ValueError:
            pass
    return ErrorCode.PACK_ERROR, f"{type(exc).__name__}: {exc}"


class PackStopped(BaseException):
    """Raised into a pack at its next progress report once the lease is lost.

    A BaseException so that a pack's own `except Exception` cannot swallow it.
    """


def _progress_writer(deps, run_id: str, tenant_id: str, lease_token: str, heartbeat: Heartbeat, timed_out: tuple):
    # The first write comes once the pack has run for the interval: a pack that
    # ends sooner writes none (COMMIT sets progress 1.0), which saves a fast
    # run two transactions (profiled). Slow packs report every interval.
    last = [time.monotonic()]
    first = [True]

    def progress(fraction: float) -> None:
        if heartbeat.lost.is_set():
            raise PackStopped(run_id)
        if first[0]:
            first[0] = False
            fault_point("mid_pack", tenant_id)
        now = time.monotonic()
        if now - last[0] < PROGRESS_MIN_INTERVAL_SEC:
            return
        last[0] = now
        try:
            with deps.db.transaction() as session:
                RunRepository(session).set_progress(run_id, lease_token, max(0.0, min(1.0, float(fraction))))
        except timed_out:  # the pack's time limit, landed in this write: it ends the pack
            raise
        except Exception:  # progress is advisory; never fail a run for it
            log.debug("progress write failed", exc_info=True)

    return progress
