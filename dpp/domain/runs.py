"""The run state machine: the only place a run's state may change (SPEC §3).

Each transition checks a snapshot of the run and returns the fields to write.
The repository writes them with a compare-and-set on `version`, so a check
here plus a matching version in the UPDATE is atomic: if anything else moved
the run in between, the write matches no row and the caller lost the race.

    QUEUED --claim_lease--> PROCESSING --claim_finalize--> (CLAIMED) --commit--> COMPLETED | FAILED
      |                         |                                                     ^
      +--claim_unstarted--> (CLAIMED) --commit_failed--------------------------------+ (charge 0)
                                +--expire (sweep) --commit_failed--------------------+ (minimum fee)
"""
from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from dpp.domain.errors import InvalidTransition


class RunStatus(str, enum.Enum):
    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        return self in (RunStatus.COMPLETED, RunStatus.FAILED)


class FinalizeStage(str, enum.Enum):
    NONE = "NONE"
    CLAIMED = "CLAIMED"
    COMMITTED = "COMMITTED"


class MoneyState(str, enum.Enum):
    RESERVED = "RESERVED"
    SETTLED = "SETTLED"
    AUDIT_REQUIRED = "AUDIT_REQUIRED"


class ErrorCode(str, enum.Enum):
    PACK_ERROR = "PACK_ERROR"
    PACK_TIMEOUT = "PACK_TIMEOUT"  # the pack ran past its time limit (charged the minimum fee)
    LEASE_EXPIRED = "LEASE_EXPIRED"
    ROLLED_BACK = "ROLLED_BACK"
    ENQUEUE_FAILED = "ENQUEUE_FAILED"
    QUEUE_TIMEOUT = "QUEUE_TIMEOUT"
    CANCELED = "CANCELED"
    URL_BLOCKED = "URL_BLOCKED"  # the url pack refused an address (at run time)
    FETCH_FAILED = "FETCH_FAILED"  # the url pack could not fetch (DNS, connect, TLS, timeout, redirects)


@dataclass(frozen=True)
class RunSnapshot:
    """What the state machine needs to know about a run to judge a transition."""

    run_id: str
    version: int
    status: RunStatus
    finalize_stage: FinalizeStage
    money_state: MoneyState
    lease_token: str | None
    lease_expires_at: datetime | None
    reserved_micros: int
    minimum_fee_micros: int
    enqueue_attempts: int = 1
    finalize_claimed_at: datetime | None = None


Changes = dict[str, Any]


def _require(cond: bool, why: str) -> None:
    if not cond:
        raise InvalidTransition(why)


def claim_lease(run: RunSnapshot, *, token: str, now: datetime, ttl_sec: int) -> Changes:
    """QUEUED -> PROCESSING under a fresh lease (the worker's claim)."""
    _require(run.status is RunStatus.QUEUED, f"run is {run.status.value}, not QUEUED")
    _require(run.finalize_stage is FinalizeStage.NONE, "run is being finalized")
    return {
        "status": RunStatus.PROCESSING,
        "lease_token": token,
        "lease_expires_at": now + timedelta(seconds=ttl_sec),
        "started_at": now,
    }


def lease_live(run: RunSnapshot, now: datetime) -> bool:
    return (
        run.status is RunStatus.PROCESSING
        and run.lease_expires_at is not None
        and run.lease_expires_at > now
    )


def extend_lease(run: RunSnapshot, *, token: str, now: datetime, ttl_sec: int) -> Changes:
    """The heartbeat: only the lease holder, only while nothing is finalizing."""
    _require(run.status is RunStatus.PROCESSING, "run is not PROCESSING")
    _require(run.lease_token == token, "lease token does not match")
    _require(run.finalize_stage is FinalizeStage.NONE, "run is finalizing")
    return {"lease_expires_at": now + timedelta(seconds=ttl_sec)}


def claim_finalize(run: RunSnapshot, *, token: str, now: datetime) -> Changes:
    """Phase 1 of finalize: from here on only COMMIT or the reconciler may end the run."""
    _require(run.status is RunStatus.PROCESSING, f"run is {run.status.value}, not PROCESSING")
    _require(run.lease_token == token, "lease token does not match")
    _require(run.finalize_stage is FinalizeStage.NONE, f"finalize already {run.finalize_stage.value}")
    _require(lease_live(run, now), "lease has expired")
    return {"finalize_stage": FinalizeStage.CLAIMED, "finalize_claimed_at": now}


def claim_unstarted(run: RunSnapshot, *, now: datetime) -> Changes:
    """Phase 1 for a run that never started (enqueue failed, stale in the queue).

    Claiming first, rather than failing outright, shuts out a worker that
    receives the message at this instant: its lease claim needs stage NONE.
    """
    _require(run.status is RunStatus.QUEUED, f"run is {run.status.value}, not QUEUED")
    _require(run.finalize_stage is FinalizeStage.NONE, f"finalize already {run.finalize_stage.value}")
    return {"finalize_stage": FinalizeStage.CLAIMED, "finalize_claimed_at": now}


def redrive(run: RunSnapshot, *, now: datetime, max_attempts: int) -> Changes:
    """Publish a QUEUED run's message again: it waited too long, so it may be lost.

    Counted first, so a crash before the publish costs an attempt, never a loop.
    A run out of attempts is not re-driven: it ends (claim_unstarted, charge 0).
    Duplicate deliveries are harmless: the lease claim lets only one worker in.
    """
    _require(run.status is RunStatus.QUEUED, f"run is {run.status.value}, not QUEUED")
    _require(run.finalize_stage is FinalizeStage.NONE, f"finalize already {run.finalize_stage.value}")
    _require(run.enqueue_attempts < max_attempts, f"{run.enqueue_attempts} of {max_attempts} publishes used")
    return {"enqueue_attempts": run.enqueue_attempts + 1, "enqueued_at": now}


def commit_completed(run: RunSnapshot, *, actual_cost_micros: int, now: datetime) -> Changes:
    """Phase 2 of finalize for a successful pack; the charge is already capped."""
    _require(run.finalize_stage is FinalizeStage.CLAIMED, "finalize is not CLAIMED")
    _require(0 <= actual_cost_micros <= run.reserved_micros, "charge outside 0..reserved")
    return {
        "status": RunStatus.COMPLETED,
        "finalize_stage": FinalizeStage.COMMITTED,
        "money_state": MoneyState.SETTLED,
        "actual_cost_micros": actual_cost_micros,
        "finished_at": now,
        "lease_token": None,
    }


def commit_failed(
    run: RunSnapshot, *, error_code: ErrorCode, error_message: str, charge_micros: int, now: datetime
) -> Changes:
    """Any FAILED ending; the caller decides the charge by `failure_charge`."""
    _require(not run.status.terminal, f"run is already {run.status.value}")
    _require(run.finalize_stage is not FinalizeStage.COMMITTED, "run is already committed")
    _require(0 <= charge_micros <= run.reserved_micros, "charge outside 0..reserved")
    return {
        "status": RunStatus.FAILED,
        "finalize_stage": FinalizeStage.COMMITTED,
        "money_state": MoneyState.SETTLED,
        "actual_cost_micros": charge_micros,
        "error_code": error_code.value,
        "error_message": error_message[:500],
        "finished_at": now,
        "lease_token": None,
    }


def failure_charge(run: RunSnapshot, started: bool) -> int:
    """SPEC §2: a run that started pays the minimum fee (capped); one that never started pays 0."""
    return min(run.minimum_fee_micros, run.reserved_micros) if started else 0


def claim_expired(run: RunSnapshot, *, now: datetime, force: bool = False) -> Changes:
    """The lease sweep's claim: a PROCESSING run whose lease ran out, not finalizing.

    The worker holding the stale lease can no longer CLAIM (its lease is not
    live), so after this only the sweep ends the run. `force` (an engineer's
    `reconcile_run`) takes a live lease too: clearing the token makes the
    worker's heartbeat and CLAIM fail, so it stops without finalizing.
    """
    _require(run.status is RunStatus.PROCESSING, f"run is {run.status.value}, not PROCESSING")
    _require(run.finalize_stage is FinalizeStage.NONE, f"finalize already {run.finalize_stage.value}")
    _require(force or not lease_live(run, now), "lease is still live")
    return {"finalize_stage": FinalizeStage.CLAIMED, "finalize_claimed_at": now, "lease_token": None}


def take_over_claim(run: RunSnapshot, *, now: datetime) -> Changes:
    """The reconciler takes a stuck CLAIMED run. Re-stamping the claim time keeps
    a concurrent reconcile (or the next sweep) off it while this one works."""
    _require(run.finalize_stage is FinalizeStage.CLAIMED, f"finalize is {run.finalize_stage.value}, not CLAIMED")
    _require(not run.status.terminal, f"run is already {run.status.value}")
    return {"finalize_claimed_at": now}


def reconcile_refusal(run: RunSnapshot, *, now: datetime, threshold: timedelta) -> str | None:
    """Why an engineer's reconcile must leave this run alone for now; None when it may act.

    A finalize claim younger than the reconcile threshold, or a live lease,
    means a worker may be finishing the run this instant: settling it under
    the worker makes two settlements race for one run's money. The
    reconcile_stuck sweep waits the same threshold.
    """
    if run.finalize_stage is FinalizeStage.CLAIMED and run.finalize_claimed_at is not None:
        age = now - run.finalize_claimed_at
        if age < threshold:
            return (f"claim is {age.total_seconds():.0f} s old, younger than the "
                    f"{threshold.total_seconds():.0f} s threshold")
    if run.finalize_stage is FinalizeStage.NONE and lease_live(run, now):
        left = run.lease_expires_at - now
        return f"lease is live for another {left.total_seconds():.0f} s (a worker holds it)"
    return None


def mark_audit_required(run: RunSnapshot, *, reason: str) -> Changes:
    """A contradiction nobody may silently fix: flag it and keep the money where it is."""
    return {"money_state": MoneyState.AUDIT_REQUIRED, "error_message": reason[:500]}


def is_run_id(value: str) -> bool:
    """A run id is a UUID; anything else (a hold key written by hand, a typo) is not."""
    try:
        uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return False
    return True
