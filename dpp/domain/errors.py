"""Domain errors. Each maps to one RFC 9457 problem in `dpp.api.errors`."""
from __future__ import annotations


class DppError(Exception):
    """Base of every error the product raises on purpose."""


class InvalidMoney(DppError, ValueError):
    """A money string that is not a plain decimal with at most 6 fractional digits."""


class InvalidPackInputs(DppError):
    """Pack inputs that fail validation; `errors` maps field paths to messages."""

    def __init__(self, errors: dict[str, list[str]]):
        super().__init__("invalid pack inputs")
        self.errors = errors


class PackFailed(DppError):
    """A pack ending its run on purpose, with a named error code (charged the minimum fee).

    The worker records `code` as the run's error_code when the state machine knows it
    (`dpp.domain.runs.ErrorCode`), else PACK_ERROR.
    """

    code = "PACK_ERROR"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class UnknownPackType(DppError):
    def __init__(self, pack_type: str):
        super().__init__(f"unknown pack_type {pack_type!r}")
        self.pack_type = pack_type


class InsufficientBudget(DppError):
    def __init__(self, available_micros: int, requested_micros: int):
        super().__init__("insufficient budget")
        self.available_micros = available_micros
        self.requested_micros = requested_micros


class IdempotencyMismatch(DppError):
    """Same Idempotency-Key, different payload."""


class ReferenceConflict(DppError):
    """An operator's reference already names a different top-up or adjustment.

    A reference is the operator's idempotency key: replaying it with the same
    amount is a no-op, with another amount it is a mistake nobody may resolve
    by guessing which of the two was meant.
    """

    def __init__(self, reference: str, posted_micros: int, requested_micros: int):
        super().__init__(f"reference {reference!r} was already posted for {posted_micros} micros, not {requested_micros}")
        self.reference = reference
        self.posted_micros = posted_micros
        self.requested_micros = requested_micros


class RunNotFound(DppError):
    pass


class AuthenticationFailed(DppError):
    pass


class Forbidden(DppError):
    pass


class PlanViolation(DppError):
    """The request is well formed but the tenant's plan does not allow it."""

    def __init__(self, detail: str, field: str | None = None):
        super().__init__(detail)
        self.detail = detail
        self.field = field


class DependencyUnavailable(DppError):
    """Redis, PostgreSQL or the queue did not answer; nothing was kept."""

    def __init__(self, dependency: str, detail: str = ""):
        super().__init__(f"{dependency} unavailable{': ' + detail if detail else ''}")
        self.dependency = dependency


class AdmissionsClosed(DppError):
    """New submissions are refused for now: the platform is paused, or the tenant's
    admissions are frozen after a money alarm. A 503 of its own, with Retry-After."""

    def __init__(self, scope: str, kind: str):
        super().__init__(f"admissions {kind}d for {scope}")
        self.scope = scope
        self.kind = kind  # "pause" (the platform) or "freeze" (one tenant)


class InvalidTransition(DppError):
    """A run state change that the state machine forbids."""


class LeaseLost(DppError):
    """The worker no longer holds the run's lease; it must not finalize."""


class BadCursor(DppError):
    """A pagination cursor this server did not hand out (or one for another listing)."""


class ResultGone(DppError):
    """The result existed but is past the plan's retention (its owner gets 410)."""


class ResultNotReady(DppError):
    """The run has no stored result (not COMPLETED yet, or it FAILED)."""


class RateLimited(DppError):
    """429. `limit` names which: "rate" (submissions per minute) or "concurrency"
    (runs in flight); each has its own problem type, so an agent can tell
    "slow down" from "wait for a run to finish"."""

    def __init__(self, detail: str, retry_after_sec: int, headers: dict[str, str] | None = None,
                 limit: str = "rate"):
        super().__init__(detail)
        self.detail = detail
        self.retry_after_sec = retry_after_sec
        self.headers = headers or {}
        self.limit = limit
