"""Submit a run: validate, reserve, record, enqueue (SPEC §3 "Submission").

Safe against a crash between any two steps:
  idempotency lookup, the tenant's fence and runs-in-flight check, hold
  (Redis), run row + RESERVE (one PostgreSQL transaction, committed after the
  hold; the fence is held until that commit) -> enqueue.
- The row insert fails: the hold is released here, nothing was recorded.
- The enqueue fails: the run is settled at 0 (never started) before we answer
  503, and its idempotency key is given back so the agent's retry can succeed.
- A crash after the insert and before the enqueue leaves a QUEUED run with a
  RESERVE that `dpp.sweep_stale_queued` fails and releases.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from dpp import metrics
from dpp.adapters import orm
from dpp.adapters.outages import database_outage
from dpp.adapters.repository import RunRepository, fence_tenant
from dpp.domain.canonical import sha256_hex
from dpp.domain.errors import (
    DependencyUnavailable, Forbidden, IdempotencyMismatch, InsufficientBudget, PlanViolation,
)
from dpp.domain.money import format_usd
from dpp.domain.packs.base import time_limits
from dpp.domain.runs import ErrorCode, RunStatus
from dpp.faults import fault_point
from dpp.services import admissions, finalize, ledger, limits
from dpp.services.tenants import Principal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submission:
    pack_type: str
    inputs: Any
    max_cost_micros: int
    max_cost_text: str


@dataclass(frozen=True)
class Submitted:
    run: orm.Run
    replayed: bool
    rate_headers: dict[str, str] | None = None  # the IETF RateLimit headers, when this one was counted


def payload_hash(sub: Submission) -> str:
    return sha256_hex({"pack_type": sub.pack_type, "inputs": sub.inputs, "max_cost_usd": format_usd(sub.max_cost_micros)})


def submit_run(deps, principal: Principal, idempotency_key: str, sub: Submission, trace_id: str) -> Submitted:
    """Idempotency decides first: a replay of a key whose first request finished, or
    is in flight, answers as that request did, and is never counted, limited,
    refused for money or held a second time (issue 14)."""
    digest = payload_hash(sub)
    run_id = str(uuid.uuid4())
    held = written = False
    try:
        # One transaction from the idempotency lookup to the insert: a submission
        # costs one pool checkout and one commit (profiled: each is a round trip).
        with deps.db.transaction() as session:
            earlier = _earlier_in(session, principal.tenant_id, idempotency_key, digest)
            if earlier is not None:
                return Submitted(earlier, replayed=True)
            pack, inputs = _admit(deps, principal, sub)
            # The tenant's fence: it serialises the tenant's submissions to their
            # commit. A first request with this key that was in flight has
            # committed by the time it is ours, so look again before counting,
            # limiting or holding anything. And from here to the commit no
            # rebuild of the tenant's Redis mirror can run, so none can read a
            # ledger that misses the hold made below.
            fence_tenant(session, principal.tenant_id)
            earlier = _earlier_in(session, principal.tenant_id, idempotency_key, digest)
            if earlier is not None:
                return Submitted(earlier, replayed=True)
            admissions.check(session, principal.tenant_id)  # paused platform, frozen tenant: 503
            rate_headers = limits.check_submit_rate(deps, principal)
            limits.check_concurrency(session, principal, rate_headers)
            ledger.hold(deps, session, principal.tenant_id, run_id, sub.max_cost_micros)
            held = True
            fault_point("after_reserve", principal.tenant_id)
            run = orm.Run(
                id=uuid.UUID(run_id),
                tenant_id=principal.tenant_id,
                pack_type=pack.pack_type,
                pack_version=pack.version,
                inputs=inputs,
                idempotency_key=idempotency_key,
                payload_hash=digest,
                status=RunStatus.QUEUED.value,
                reserved_micros=sub.max_cost_micros,
                minimum_fee_micros=principal.minimum_fee_micros,
                trace_id=trace_id,
            )
            RunRepository(session).add(run)  # server defaults come back in the INSERT's RETURNING
            ledger.record_reservation(session, principal.tenant_id, run_id, sub.max_cost_micros)
            written = True  # what fails from here on is the COMMIT itself
    except IntegrityError as exc:
        ledger.unhold(deps, principal.tenant_id, run_id)
        if "available_nonneg" in str(exc.orig):
            # The gate admitted it on money Redis has already released for a run
            # whose ledger COMMIT is still pending (finalize settles Redis first).
            # The ledger is the truth and cannot back the cap yet: 402, nothing held.
            raise InsufficientBudget(ledger.available(deps, principal.tenant_id), sub.max_cost_micros) from exc
        if "uq_runs_tenant_idempotency" not in str(exc.orig):
            raise
        # A concurrent request with the same key won the insert: answer as it did.
        earlier = _earlier(deps, principal.tenant_id, idempotency_key, digest)
        if earlier is None:
            raise DependencyUnavailable("database", "idempotency race") from exc
        return Submitted(earlier, replayed=True)
    except BaseException as exc:
        if held and written and database_outage(exc):
            # The COMMIT's outcome is unknown: the server may have committed before
            # the connection died (or before the API stopped waiting for it). Giving
            # the hold back now could hand the same money out twice if the run is in
            # the ledger; the orphan sweep judges the hold under the tenant's fence
            # once its grace is past (the run there, or not), and a committed run
            # that was never published is re-driven by the stale-queued sweep.
            log.warning("submission's commit outcome unknown; its hold is left to the orphan sweep",
                        extra={"run_id": run_id, "tenant_id": principal.tenant_id})
        elif held:
            ledger.unhold(deps, principal.tenant_id, run_id)
        if isinstance(exc, SQLAlchemyError):
            raise DependencyUnavailable("database", type(exc).__name__) from exc
        raise

    fault_point("after_run_row", principal.tenant_id)
    try:
        deps.queue.enqueue_run(run_id, trace_id, time_limits(pack))
    except DependencyUnavailable:
        ended = finalize.fail_unstarted(deps, run_id, ErrorCode.ENQUEUE_FAILED, "the run could not be enqueued")
        if ended is not None:
            raise
        # The publish did reach the queue (only its answer was lost) and a
        # worker has claimed the run: it is live, so answer as a success.
    fault_point("after_enqueue", principal.tenant_id)
    metrics.RUNS_SUBMITTED.labels(pack.pack_type).inc()
    metrics.MONEY_RESERVED.inc(sub.max_cost_micros)
    log.info("run submitted", extra={"run_id": run_id, "tenant_id": principal.tenant_id,
                                     "pack_type": pack.pack_type, "reserved_micros": sub.max_cost_micros})
    # The row as inserted: the answer to a submission is always QUEUED (SPEC §4).
    return Submitted(run, replayed=False, rate_headers=rate_headers)


def _admit(deps, principal: Principal, sub: Submission):
    """The pack and its validated inputs, or the reason the plan refuses them."""
    pack = deps.packs.get(sub.pack_type)
    if sub.pack_type not in principal.allowed_pack_types:
        raise Forbidden(f"pack_type {sub.pack_type!r} is not in plan {principal.plan_id!r}")
    inputs = pack.validate(sub.inputs)
    if sub.max_cost_micros > principal.max_cost_per_run_micros:
        raise PlanViolation(
            f"max_cost_usd exceeds plan {principal.plan_id!r} limit of "
            f"{format_usd(principal.max_cost_per_run_micros)}",
            field="max_cost_usd",
        )
    price = pack.min_price_micros(inputs)
    if sub.max_cost_micros < price:
        raise PlanViolation(
            f"max_cost_usd {format_usd(sub.max_cost_micros)} is below this run's price {format_usd(price)}",
            field="max_cost_usd",
        )
    return pack, inputs


def _earlier(deps, tenant_id: str, key: str, digest: str) -> orm.Run | None:
    with deps.db.transaction() as session:
        return _earlier_in(session, tenant_id, key, digest)


def _earlier_in(session, tenant_id: str, key: str, digest: str) -> orm.Run | None:
    run = RunRepository(session).by_idempotency_key(tenant_id, key)
    if run is not None and run.payload_hash != digest:
        raise IdempotencyMismatch("Idempotency-Key was used with a different payload")
    return run
