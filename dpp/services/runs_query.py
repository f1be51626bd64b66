"""Read side: what an agent sees of its runs and its balance."""
from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from sqlalchemy import select, tuple_

from dpp.adapters import orm
from dpp.adapters.repository import RunRepository, utcnow
from dpp.domain.errors import BadCursor, ResultGone, ResultNotReady, RunNotFound
from dpp.domain.money import format_usd
from dpp.services import ledger

MAX_PAGE = 100
MAX_USAGE_DAYS = 366


@dataclass(frozen=True)
class Page:
    items: list[dict]
    next_cursor: str | None


def _encode_cursor(kind: str, values: list) -> str:
    raw = json.dumps([kind, *values], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(kind: str, cursor: str, arity: int) -> list:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        decoded = json.loads(raw)
    except (ValueError, json.JSONDecodeError) as exc:
        raise BadCursor("cursor is not valid") from exc
    if not isinstance(decoded, list) or len(decoded) != arity + 1 or decoded[0] != kind:
        raise BadCursor("cursor is not valid for this listing")
    return decoded[1:]


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


def view(deps, run: orm.Run, now: datetime | None = None, *, presign: bool = True) -> dict:
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
    expired = now is not None and _expired(run, now)
    body["result_expires_at"] = _iso(run.retention_until)
    if presign and run.status == "COMPLETED" and run.result_key and not expired:
        ttl = deps.settings.presign_ttl_sec
        if run.retention_until is not None and now is not None:
            # A link must not outlive the result it points to.
            ttl = max(1, min(ttl, int((run.retention_until - now).total_seconds())))
        body["result_url"] = deps.results.presign(run.result_key, ttl)
        body["result_url_expires_at"] = _iso((now or datetime.now(timezone.utc)) + timedelta(seconds=ttl))
    return body


def get_run(deps, tenant_id: str, run_id: str) -> dict | None:
    with deps.db.transaction() as session:
        run, now = RunRepository(session).get_for_tenant_with_now(tenant_id, run_id)
    return None if run is None else view(deps, run, now)


def list_runs(deps, tenant_id: str, *, status: str | None, limit: int, cursor: str | None) -> Page:
    """Newest first, keyset pagination on (created_at, id): stable under inserts."""
    stmt = select(orm.Run).where(orm.Run.tenant_id == tenant_id)
    if status:
        stmt = stmt.where(orm.Run.status == status)
    if cursor:
        created_iso, run_id = _decode_cursor("runs", cursor, 2)
        if not isinstance(created_iso, str) or not isinstance(run_id, str):
            raise BadCursor("cursor is not valid")
        try:
            after = (datetime.fromisoformat(created_iso), uuid.UUID(run_id))
        except (TypeError, ValueError) as exc:
            raise BadCursor("cursor is not valid") from exc
        stmt = stmt.where(tuple_(orm.Run.created_at, orm.Run.id) < after)
    stmt = stmt.order_by(orm.Run.created_at.desc(), orm.Run.id.desc()).limit(limit + 1)
    with deps.db.transaction() as session:
        rows = list(session.execute(stmt).scalars())
        now = utcnow(session)
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = _encode_cursor("runs", [rows[-1].created_at.isoformat(), str(rows[-1].id)]) if more else None
    return Page([view(deps, r, now, presign=False) for r in rows], next_cursor)


def result(deps, tenant_id: str, run_id: str) -> bytes:
    """The stored envelope itself; the owner learns it is gone (410), others that it is not there (404)."""
    with deps.db.transaction() as session:
        run = RunRepository(session).get_for_tenant(tenant_id, run_id)
        now = utcnow(session)
    if run is None:
        raise RunNotFound(run_id)
    if _expired(run, now):
        raise ResultGone(run_id)
    if run.status != "COMPLETED" or not run.result_key:
        raise ResultNotReady(run_id)
    body = deps.results.get(run.result_key)
    if body is None:  # purged by the retention sweep a moment ago
        raise ResultGone(run_id)
    return body


def _expired(run: orm.Run, now: datetime) -> bool:
    # The boundary instant belongs to "expired": retention_until is the first moment it is gone.
    return run.retention_until is not None and now >= run.retention_until


def usage(deps, tenant_id: str, start: date, end: date) -> list[dict]:
    with deps.db.transaction() as session:
        rows = session.execute(
            select(orm.UsageDaily)
            .where(orm.UsageDaily.tenant_id == tenant_id, orm.UsageDaily.day >= start, orm.UsageDaily.day <= end)
            .order_by(orm.UsageDaily.day)
        ).scalars()
        return [
            {
                "date": r.day.isoformat(),
                "runs_completed": r.runs_completed,
                "runs_failed": r.runs_failed,
                "charged_usd": format_usd(r.charged_micros),
                "released_usd": format_usd(r.released_micros),
            }
            for r in rows
        ]


def statement(deps, tenant_id: str, *, limit: int, cursor: str | None) -> Page:
    """The tenant's transfers, newest first (keyset on the BIGINT id)."""
    stmt = select(orm.LedgerTransfer).where(orm.LedgerTransfer.tenant_id == tenant_id)
    if cursor:
        (before,) = _decode_cursor("ledger", cursor, 1)
        if not isinstance(before, int) or isinstance(before, bool):
            raise BadCursor("cursor is not valid")
        stmt = stmt.where(orm.LedgerTransfer.id < before)
    stmt = stmt.order_by(orm.LedgerTransfer.id.desc()).limit(limit + 1)
    with deps.db.transaction() as session:
        rows = list(session.execute(stmt).scalars())
    more = len(rows) > limit
    rows = rows[:limit]
    items = [
        {
            "transfer_id": str(r.id),
            "kind": r.kind,
            "debit_account": r.debit_account,
            "credit_account": r.credit_account,
            "amount_usd": format_usd(r.amount_micros),
            "run_id": str(r.run_id) if r.run_id else None,
            "memo": r.memo,
            "created_at": _iso(r.created_at),
        }
        for r in rows
    ]
    return Page(items, _encode_cursor("ledger", [rows[-1].id]) if more else None)


def balance(deps, tenant_id: str) -> dict:
    with deps.db.transaction() as session:
        books = ledger.balances(session, tenant_id)
    return {
        "tenant_id": tenant_id,
        "available_usd": format_usd(books.available),
        "held_usd": format_usd(books.held),
        "spent_usd": format_usd(books.spent),
    }
