"""Tenants, plans and API keys: who may spend, and under which plan."""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime, timezone


from dpp.adapters import orm
from dpp.adapters.repository import TenantRepository
from dpp.domain import keys
from dpp.domain.errors import AuthenticationFailed, DppError, Forbidden
from dpp.services import ledger

# Public plan table (docs/api.md). Money in micros.
PLANS = {
    "free": dict(
        max_cost_per_run_micros=1_000_000, rate_limit_per_min=10, max_concurrent_runs=2,
        allowed_pack_types=["decision"], retention_days=7, minimum_fee_micros=1_000,
    ),
    "basic": dict(
        max_cost_per_run_micros=5_000_000, rate_limit_per_min=60, max_concurrent_runs=5,
        allowed_pack_types=["decision", "url"], retention_days=30, minimum_fee_micros=2_000,
    ),
    "pro": dict(
        max_cost_per_run_micros=50_000_000, rate_limit_per_min=600, max_concurrent_runs=20,
        allowed_pack_types=["decision", "url"], retention_days=90, minimum_fee_micros=5_000,
    ),
}


class TenantExists(DppError):
    pass


class UnknownTenant(DppError):
    pass


class UnknownPlan(DppError):
    pass


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    tenant_id: str
    plan_id: str
    max_cost_per_run_micros: int
    allowed_pack_types: tuple[str, ...]
    minimum_fee_micros: int
    retention_days: int
    rate_limit_per_min: int
    max_concurrent_runs: int


def seed_plans(deps, extra_pack_types: tuple[str, ...] = ()) -> None:
    with deps.db.transaction() as session:
        repo = TenantRepository(session)
        for plan_id, values in PLANS.items():
            allowed = list(dict.fromkeys([*values["allowed_pack_types"], *extra_pack_types]))
            repo.upsert_plan(id=plan_id, **{**values, "allowed_pack_types": allowed})


def create_tenant(deps, tenant_id: str, plan_id: str) -> None:
    with deps.db.transaction() as session:
        repo = TenantRepository(session)
        if repo.plan(plan_id) is None:
            raise UnknownPlan(plan_id)
        if repo.get(tenant_id) is not None:
            raise TenantExists(tenant_id)
        session.add(orm.Tenant(id=tenant_id, plan_id=plan_id))
        session.flush()
        ledger.open_accounts(session, tenant_id)


def issue_key(deps, tenant_id: str) -> str:
    """Make a key and store only its hash; the caller shows it once."""
    key = keys.generate()
    with deps.db.transaction() as session:
        if TenantRepository(session).get(tenant_id) is None:
            raise UnknownTenant(tenant_id)
        session.add(
            orm.ApiKey(tenant_id=tenant_id, key_hash=keys.key_hash(key), display_prefix=keys.display_prefix(key))
        )
    return key


def revoke_key(deps, key: str) -> bool:
    with deps.db.transaction() as session:
        row = TenantRepository(session).key_by_hash(keys.key_hash(key))
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = datetime.now(timezone.utc)
        return True


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown of a key: never the key itself (only its hash is stored)."""

    id: int
    tenant_id: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


def _info(row: orm.ApiKey) -> KeyInfo:
    return KeyInfo(row.id, row.tenant_id, row.display_prefix, row.created_at, row.revoked_at)


def list_keys(deps, tenant_id: str) -> list[KeyInfo]:
    with deps.db.transaction() as session:
        repo = TenantRepository(session)
        if repo.get(tenant_id) is None:
            raise UnknownTenant(tenant_id)
        return [_info(row) for row in repo.keys(tenant_id)]


class AmbiguousKey(DppError):
    def __init__(self, matches: list[KeyInfo]):
        super().__init__(f"{len(matches)} active keys match")
        self.matches = matches


def revoke_key_by(deps, *, key_id: int | None = None, prefix: str | None = None) -> KeyInfo | None:
    """Revoke one active key named by its id or by its shown prefix (the plaintext
    is shown once and rarely kept). None if none matches; AmbiguousKey if several."""
    with deps.db.transaction() as session:
        repo = TenantRepository(session)
        if key_id is not None:
            row = session.get(orm.ApiKey, key_id)
            rows = [row] if row is not None and row.revoked_at is None else []
        else:
            rows = repo.active_keys_by_prefix(prefix or "")
        if len(rows) > 1:
            raise AmbiguousKey([_info(r) for r in rows])
        if not rows:
            return None
        rows[0].revoked_at = datetime.now(timezone.utc)
        return _info(rows[0])


def set_status(deps, tenant_id: str, status: str) -> str:
    """Suspend or resume a tenant; it takes effect on its next request (every
    request authenticates against the database). Returns the previous status."""
    with deps.db.transaction() as session:
        row = TenantRepository(session).get(tenant_id)
        if row is None:
            raise UnknownTenant(tenant_id)
        previous, row.status = row.status, status
        return previous


def authenticate(deps, presented: str | None) -> Principal:
    """Bearer key -> Principal. Format and checksum first: a bad key costs no query."""
    if not presented or not keys.well_formed(presented):
        raise AuthenticationFailed("missing or malformed API key")
    digest = keys.key_hash(presented)
    with deps.db.transaction() as session:
        repo = TenantRepository(session)
        found = repo.credentials(digest)
        if found is None or not hmac.compare_digest(found[0].key_hash, digest):
            raise AuthenticationFailed("unknown API key")
        row, tenant, plan = found
        if row.revoked_at is not None:
            raise Forbidden("API key revoked")
        if tenant.status != "active":
            raise Forbidden("tenant suspended")
        return Principal(
            tenant_id=tenant.id,
            plan_id=plan.id,
            max_cost_per_run_micros=plan.max_cost_per_run_micros,
            allowed_pack_types=tuple(plan.allowed_pack_types),
            minimum_fee_micros=plan.minimum_fee_micros,
            retention_days=plan.retention_days,
            rate_limit_per_min=plan.rate_limit_per_min,
            max_concurrent_runs=plan.max_concurrent_runs,
        )


def tenant_exists(deps, tenant_id: str) -> bool:
    with deps.db.transaction() as session:
        return TenantRepository(session).get(tenant_id) is not None


__all__ = [
    "PLANS", "Principal", "TenantExists", "UnknownPlan", "UnknownTenant",
    "AmbiguousKey", "KeyInfo", "authenticate", "create_tenant", "issue_key", "list_keys", "revoke_key",
    "revoke_key_by", "seed_plans", "set_status", "tenant_exists",
]
