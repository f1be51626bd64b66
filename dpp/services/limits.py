"""Plan limits that are not money: submission rate and runs in flight (SPEC §4)."""
from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dpp.adapters import orm
from dpp.domain.errors import RateLimited
from dpp.services.tenants import Principal

SUBMIT_POLICY = "post-runs"
WINDOW_SEC = 60
CONCURRENCY_RETRY_AFTER_SEC = 5


def check_submit_rate(deps, who: Principal) -> dict[str, str]:
    """Count this POST and refuse it past the plan's per-minute limit.

    Returns the IETF RateLimit-Policy / RateLimit headers for the response.
    """
    limit = who.rate_limit_per_min
    window = deps.rate_limiter.hit(who.tenant_id, SUBMIT_POLICY, WINDOW_SEC)
    remaining = max(0, limit - window.position)
    headers = {
        "RateLimit-Policy": f'"{SUBMIT_POLICY}";q={limit};w={WINDOW_SEC}',
        "RateLimit": f'"{SUBMIT_POLICY}";r={remaining};t={window.reset_after_sec}',
    }
    if window.position > limit:
        raise RateLimited(
            f"Plan {who.plan_id!r} allows {limit} run submissions per minute.",
            retry_after_sec=window.reset_after_sec,
            headers=headers,
        )
    return headers


def check_concurrency(session: Session, who: Principal, rate_headers: dict[str, str] | None = None) -> None:
    """Refuse a run past the plan's runs in flight. Call inside the insert's transaction,
    after `fence_tenant`: the fence serialises one tenant's inserts for the length of
    that short transaction, so two submissions cannot both see room for one more.
    """
    active = session.execute(
        select(func.count())
        .select_from(orm.Run)
        .where(orm.Run.tenant_id == who.tenant_id, orm.Run.status.in_(("QUEUED", "PROCESSING")))
    ).scalar_one()
    if active >= who.max_concurrent_runs:
        raise RateLimited(
            f"Plan {who.plan_id!r} allows {who.max_concurrent_runs} runs in flight; wait for one to finish.",
            retry_after_sec=CONCURRENCY_RETRY_AFTER_SEC,
            headers=rate_headers,  # this submission was counted: say where the minute stands
            limit="concurrency",
        )
