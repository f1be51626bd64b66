"""A Python client for agents that pay per run: submit, wait, read the result and the budget.

    from decimal import Decimal
    from dpp.client import DppClient, InsufficientBudget

    dpp = DppClient("http://127.0.0.1:8000", api_key="dpp_live_...")
    try:
        run = dpp.submit("decision", {"question": "Which database?", ...}, max_cost_usd="0.50")
    except InsufficientBudget as exc:
        print("top up first: only", exc.available_usd, "available")
        raise
    run = dpp.wait(run.run_id, timeout=60)          # COMPLETED or FAILED
    if run.status == "COMPLETED":
        envelope = dpp.result(run.run_id)            # the stored pack_envelope.json
        print(envelope["result"], run.actual_cost_usd)  # Decimal("0.0058")
    print(dpp.balance().available_usd)               # Decimal, never float

Three decisions shape this module:

- **Money is `decimal.Decimal` or a decimal string, never a float.** The server refuses
  JSON numbers for money; this client refuses floats before they reach the wire and
  parses every `*_usd` string it receives into `Decimal`.
- **A submission carries one Idempotency-Key for all its attempts.** `submit` makes one
  up when the caller gives none and reuses it on every retry, so a POST whose response
  was lost cannot reserve the budget twice. An agent that must survive its own restart
  should pass its own key (stored with its task) instead.
- **Errors are types** mapped from the RFC 9457 problem body (`InsufficientBudget`,
  `ValidationFailed`, ...), each keeping the server's `trace_id` for support.

Only `requests` and the standard library are used, so this file can be vendored.
"""
from __future__ import annotations

import email.utils
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Iterator

import requests
from requests.structures import CaseInsensitiveDict

__all__ = [
    "DppClient", "Run", "Balance", "Transfer", "TERMINAL_STATUSES", "new_idempotency_key", "format_money",
    "DppClientError", "DppConnectionError", "RunTimeout", "DppApiError", "BadRequest", "Unauthorized",
    "InsufficientBudget", "Forbidden", "NotFound", "IdempotencyConflict", "ResultNotReady", "Gone",
    "ValidationFailed", "RateLimited", "Unavailable",
]

log = logging.getLogger(__name__)

TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED"})
USER_AGENT = "dpp-client/0.1"
_MICRO = Decimal("0.000001")

# 429 and 503 say "later" with a Retry-After; 502 and 504 come from a proxy in front of
# the API and mean the same as a dropped connection. Every other 4xx/5xx is final.
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
_TRANSPORT_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


# --------------------------------------------------------------------------- errors


class DppClientError(Exception):
    """Base of everything this client raises."""


class DppConnectionError(DppClientError):
    """The API could not be reached (or did not answer) after every retry."""


class RunTimeout(DppClientError):
    """`wait` gave up before the run reached COMPLETED or FAILED; `.run` is the last state seen."""

    def __init__(self, run_id: str, timeout: float, run: "Run | None" = None):
        self.run_id, self.timeout, self.run = run_id, timeout, run
        status = run.status if run else "unknown"
        super().__init__(f"run {run_id} not finished after {timeout:g}s (last status {status})")


class DppApiError(DppClientError):
    """An RFC 9457 problem answered by the API. `problem` is the body as sent."""

    def __init__(self, status: int, problem: dict, headers: dict | None = None):
        self.status = status
        self.problem = problem
        self.headers = CaseInsensitiveDict(headers or {})
        super().__init__(self._message())

    @property
    def type(self) -> str:
        return self.problem.get("type", "about:blank")

    @property
    def title(self) -> str:
        return self.problem.get("title", "")

    @property
    def detail(self) -> str:
        return self.problem.get("detail", "")

    @property
    def trace_id(self) -> str | None:
        return self.problem.get("trace_id")

    def _message(self) -> str:
        text = f"{self.status} {self.title}".strip()
        if self.detail:
            text += f": {self.detail}"
        if self.trace_id:
            text += f" (trace_id {self.trace_id})"
        return text


class BadRequest(DppApiError):
    """400: a malformed header or cursor."""


class Unauthorized(DppApiError):
    """401: the API key is missing, malformed or unknown."""


class InsufficientBudget(DppApiError):
    """402: the available budget is below `max_cost_usd`; nothing was reserved."""

    @property
    def available_usd(self) -> Decimal | None:
        return _money(self.problem.get("available_usd"))

    @property
    def requested_usd(self) -> Decimal | None:
        return _money(self.problem.get("requested_usd"))


class Forbidden(DppApiError):
    """403: revoked key, suspended tenant, or a pack the plan does not include."""


class NotFound(DppApiError):
    """404: no such run for this tenant (another tenant's run is also 'not found')."""


class IdempotencyConflict(DppApiError):
    """409: this Idempotency-Key was already used with a different payload."""


class ResultNotReady(DppApiError):
    """409: the run has no stored result (it is not COMPLETED)."""


class Gone(DppApiError):
    """410: the result is past the plan's retention and was deleted."""


class ValidationFailed(DppApiError):
    """422: the request was refused; `.errors` maps each field to its messages."""

    @property
    def errors(self) -> dict:
        return self.problem.get("errors") or {}


class RateLimited(DppApiError):
    """429: too many submissions this minute; `.retry_after` in seconds (or None)."""

    @property
    def retry_after(self) -> float | None:
        return _retry_after_seconds(self.headers.get("Retry-After"))


class Unavailable(DppApiError):
    """503: a dependency of the API is down; nothing was reserved."""

    @property
    def retry_after(self) -> float | None:
        return _retry_after_seconds(self.headers.get("Retry-After"))


_BY_STATUS: dict[int, type[DppApiError]] = {
    400: BadRequest, 401: Unauthorized, 402: InsufficientBudget, 403: Forbidden, 404: NotFound,
    410: Gone, 422: ValidationFailed, 429: RateLimited, 503: Unavailable,
}
_CONFLICTS: dict[str, type[DppApiError]] = {
    "idempotency-mismatch": IdempotencyConflict,
    "result-not-ready": ResultNotReady,
}


def api_error(status: int, problem: dict, headers: dict | None = None) -> DppApiError:
    """The typed error for a problem: by status, and for 409 by the problem type's last segment."""
    if status == 409:
        slug = str(problem.get("type", "")).rstrip("/").rsplit("/", 1)[-1]
        cls = _CONFLICTS.get(slug, DppApiError)
    else:
        cls = _BY_STATUS.get(status, DppApiError)
    return cls(status, problem, headers)


# --------------------------------------------------------------------------- values


def _money(value: Any) -> Decimal | None:
    """A money string from the wire as Decimal. A JSON number here would be a server bug."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"money must arrive as a decimal string, got {type(value).__name__}")
    try:
        return Decimal(value)
    except InvalidOperation as exc:
        raise ValueError(f"not a decimal amount: {value!r}") from exc


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def format_money(amount: str | Decimal) -> str:
    """The wire form of a USD amount: a str passes as is; a Decimal becomes a plain string.

    A Decimal with more than 6 decimals is refused unless the extra digits are zeros:
    silently rounding a price cap is not this client's call. Floats are refused outright.
    """
    if isinstance(amount, str):
        return amount
    if not isinstance(amount, Decimal):
        raise TypeError(
            f"money must be a decimal string such as \"0.50\" or a decimal.Decimal, not {type(amount).__name__}"
        )
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"money must be a finite, non-negative amount, got {amount}")
    if amount.as_tuple().exponent < -6:
        exact = amount.quantize(_MICRO)
        if exact != amount:
            raise ValueError(f"{amount} has more than 6 decimals; round it yourself first")
        amount = exact
    return format(amount.copy_abs(), "f")  # copy_abs: Decimal("-0") is zero, written "0"


def new_idempotency_key() -> str:
    return f"dpp-{uuid.uuid4()}"


@dataclass(frozen=True)
class Run:
    """A run as the API shows it. Money fields are Decimal; `raw` is the JSON as received.

    The 201 of a submission carries only run_id, status, pack_type, created_at and
    reserved_cost_usd; the other fields are filled by `get` / `wait`.
    """

    run_id: str
    status: str
    pack_type: str
    reserved_cost_usd: Decimal | None
    created_at: datetime | None
    actual_cost_usd: Decimal | None = None
    minimum_fee_usd: Decimal | None = None
    progress: float | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: dict | None = None
    result_url: str | None = None
    result_url_expires_at: datetime | None = None
    result_expires_at: datetime | None = None
    trace_id: str | None = None
    replayed: bool = False  # the API answered a repeated Idempotency-Key with the original 201
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_json(cls, body: dict, *, replayed: bool = False) -> "Run":
        return cls(
            run_id=body["run_id"],
            status=body["status"],
            pack_type=body.get("pack_type", ""),
            reserved_cost_usd=_money(body.get("reserved_cost_usd")),
            created_at=_time(body.get("created_at")),
            actual_cost_usd=_money(body.get("actual_cost_usd")),
            minimum_fee_usd=_money(body.get("minimum_fee_usd")),
            progress=body.get("progress"),
            started_at=_time(body.get("started_at")),
            finished_at=_time(body.get("finished_at")),
            error=body.get("error"),
            result_url=body.get("result_url"),
            result_url_expires_at=_time(body.get("result_url_expires_at")),
            result_expires_at=_time(body.get("result_expires_at")),
            trace_id=body.get("trace_id"),
            replayed=replayed,
            raw=body,
        )


@dataclass(frozen=True)
class Balance:
    """The tenant's budget from the ledger: available to reserve, held by runs in flight, spent."""

    tenant_id: str
    available_usd: Decimal
    held_usd: Decimal
    spent_usd: Decimal
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict) -> "Balance":
        return cls(
            tenant_id=body.get("tenant_id", ""),
            available_usd=_money(body["available_usd"]),
            held_usd=_money(body["held_usd"]),
            spent_usd=_money(body["spent_usd"]),
            raw=body,
        )


@dataclass(frozen=True)
class Transfer:
    """One line of the tenant's statement (`GET /v1/ledger`)."""

    transfer_id: str
    kind: str
    debit_account: str
    credit_account: str
    amount_usd: Decimal
    run_id: str | None
    memo: str | None
    created_at: datetime | None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict) -> "Transfer":
        return cls(
            transfer_id=body["transfer_id"],
            kind=body["kind"],
            debit_account=body["debit_account"],
            credit_account=body["credit_account"],
            amount_usd=_money(body["amount_usd"]),
            run_id=body.get("run_id"),
            memo=body.get("memo"),
            created_at=_time(body.get("created_at")),
            raw=body,
        )


# --------------------------------------------------------------------------- client


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds (what DPP sends) or an HTTP-date."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _problem(response) -> dict:
    """The problem body, or a stand-in when something in between answered with HTML or nothing."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return body
    text = (getattr(response, "text", "") or "")[:200]
    return {"type": "about:blank", "title": getattr(response, "reason", "") or "HTTP error",
            "status": response.status_code, "detail": text}


class DppClient:
    """One tenant's view of the DPP API (`Authorization: Bearer <api_key>`).

    `session` is any object with `requests.Session.request`'s signature; `sleep` and
    `clock` are injectable so that retry and wait timing can be tested without waiting.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 8,
        session=None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not api_key:
            raise ValueError("api_key is required")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._session = session if session is not None else requests.Session()
        self._sleep = sleep
        self._clock = clock
        self._headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json", "User-Agent": USER_AGENT}

    def __repr__(self) -> str:  # never the key
        return f"DppClient({self.base_url!r})"

    # ---- runs

    def submit(
        self, pack_type: str, inputs: dict, max_cost_usd: str | Decimal, idempotency_key: str | None = None
    ) -> Run:
        """Reserve up to `max_cost_usd` and queue a run of `pack_type`; returns the QUEUED run.

        Without `idempotency_key` a fresh `dpp-<uuid4>` is used for this call (and all its
        retries). `Run.replayed` is True when the API recognised the key and answered with
        the original submission instead of creating a run.
        """
        body = {"pack_type": pack_type, "inputs": inputs, "max_cost_usd": format_money(max_cost_usd)}
        key = idempotency_key or new_idempotency_key()
        # Retrying a POST is safe only because every attempt carries this same key: if an
        # earlier attempt did reserve and the response was lost, the API replays that run
        # instead of reserving again. A new key per attempt would double-reserve.
        response = self._request("POST", "/v1/runs", json=body, headers={"Idempotency-Key": key})
        return Run.from_json(response.json(), replayed=response.headers.get("Idempotent-Replayed") == "true")

    def get(self, run_id: str) -> Run:
        return Run.from_json(self._request("GET", f"/v1/runs/{run_id}").json())

    def wait(self, run_id: str, timeout: float = 60, poll_initial: float = 0.2, poll_max: float = 2.0) -> Run:
        """Poll until the run is COMPLETED or FAILED (returned, not raised); `RunTimeout` after `timeout` s.

        The interval starts at `poll_initial` and doubles up to `poll_max`, so a quick
        run is seen quickly and a long one does not hammer the API.
        """
        deadline = self._clock() + timeout
        delay = poll_initial
        while True:
            run = self.get(run_id)
            if run.done:
                return run
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise RunTimeout(run_id, timeout, run)
            self._sleep(min(delay, remaining))
            delay = min(delay * 2, poll_max)

    def result(self, run_id: str) -> dict:
        """The stored `pack_envelope.json` of a COMPLETED run (`ResultNotReady` before, `Gone` after retention)."""
        return self._request("GET", f"/v1/runs/{run_id}/result").json()

    def list_runs(self, status: str | None = None, limit: int = 20) -> Iterator[Run]:
        """Every run of the tenant, newest first, fetched `limit` per page; `status` filters."""
        params = {"limit": limit, **({"status": status} if status else {})}
        for item in self._pages("/v1/runs", params):
            yield Run.from_json(item)

    # ---- account

    def balance(self) -> Balance:
        return Balance.from_json(self._request("GET", "/v1/balance").json())

    def ledger(self, limit: int = 50) -> Iterator[Transfer]:
        """The tenant's statement, newest transfer first, fetched `limit` per page."""
        for item in self._pages("/v1/ledger", {"limit": limit}):
            yield Transfer.from_json(item)

    # ---- transport

    def _pages(self, path: str, params: dict) -> Iterator[dict]:
        cursor = None
        while True:
            page = self._request("GET", path, params={**params, **({"cursor": cursor} if cursor else {})}).json()
            yield from page.get("items", [])
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def _backoff(self, attempt: int) -> float:
        """Exponential with 'equal jitter': half fixed, half random, so clients spread out."""
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** attempt))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _request(self, method: str, path: str, *, params=None, json=None, headers=None):
        url = self.base_url + path
        all_headers = {**self._headers, **(headers or {})}
        attempt = 0
        while True:
            try:
                response = self._session.request(
                    method, url, params=params, json=json, headers=all_headers, timeout=self.timeout
                )
            except _TRANSPORT_ERRORS as exc:
                if attempt >= self.max_retries:
                    raise DppConnectionError(f"{method} {path}: {exc} (after {attempt + 1} attempts)") from exc
                delay = self._backoff(attempt)
                log.warning("dpp %s %s: %s; retry %d in %.2fs", method, path, type(exc).__name__, attempt + 1, delay)
            else:
                status = response.status_code
                if status < 400:
                    return response
                if status not in _RETRY_STATUSES or attempt >= self.max_retries:
                    raise api_error(status, _problem(response), response.headers)
                told = _retry_after_seconds(response.headers.get("Retry-After"))
                # The server's word wins over our schedule, within reason: a huge
                # Retry-After would stall the agent, so it is capped.
                delay = min(told, self.backoff_max * 4) if told is not None else self._backoff(attempt)
                log.warning("dpp %s %s: %d; retry %d in %.2fs", method, path, status, attempt + 1, delay)
            self._sleep(delay)
            attempt += 1
