"""Read side: what an agent sees of its runs and its balance."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from dpp.adapters import orm
from dpp.adapters.repository import RunRepository
from dpp.domain.money import format_usd
from dpp.services import ledger


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if value else None


def created_body(run: orm.Run) -> dict:
    """The 201 body. Rebuilt from the row, so an idempotent replay is byte-identical."""
    return {
        "run_id": str(run.id),
        "status": "QUEUED",
        "pack_type": run.pack_type,
        "created_at": _iso(run.created_at),
        "reserved_cost_usd": format_usd(run.reserved_micros),
    }


def view(deps, run: orm.Run) -> dict:
    body = {
        "run_id": str(run.id),
        "status": run.status,
        "pack_type": run.pack_type,
        "progress": round(run.progress or 0.0, 4),
        "reserved_cost_usd": format_usd(run.reserved_micros),
        "actual_cost_usd": format_usd(run.actual_cost_micros) if run.actual_cost_micros is not None else None,
        "minimum_fee_usd": format_usd(min(run.minimum_fee_micros, run.reserved_micros)),
        "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "error": {"code": run.error_code, "message": run.error_message or ""} if run.error_code else None,
        "result_url": None,
        "result_url_expires_at": None,
        "trace_id": run.trace_id,
    }
    if run.status == "COMPLETED" and run.result_key:
        ttl = deps.settings.presign_ttl_sec
        body["result_url"] = deps.results.presign(run.result_key, ttl)
        body["result_url_expires_at"] = _iso(datetime.now(timezone.utc) + timedelta(seconds=ttl))
    return body


def get_run(deps, tenant_id: str, run_id: str) -> dict | None:
    with deps.db.transaction() as session:
        run = RunRepository(session).get_for_tenant(tenant_id, run_id)
    return None if run is None else view(deps, run)


def balance(deps, tenant_id: str) -> dict:
    with deps.db.transaction() as session:
        books = ledger.balances(session, tenant_id)
    return {
        "tenant_id": tenant_id,
        "available_usd": format_usd(books.available),
        "held_usd": format_usd(books.held),
        "spent_usd": format_usd(books.spent),
    }
