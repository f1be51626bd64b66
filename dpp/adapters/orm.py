"""PostgreSQL schema (SQLAlchemy 2.x). Alembic migrations are generated from this.

Money columns are BIGINT micros with CHECKs; transfers are append-only. The
partial indexes cover only active runs so sweeps cost grows with the work in
flight, not with history (SPEC §3).
"""
from __future__ import annotations

import uuid
from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    SmallInteger,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TZ = DateTime(timezone=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Plan(Base):
    __tablename__ = "plans"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    max_cost_per_run_micros: Mapped[int] = mapped_column(BigInteger)
    rate_limit_per_min: Mapped[int] = mapped_column(Integer)
    max_concurrent_runs: Mapped[int] = mapped_column(Integer)
    allowed_pack_types: Mapped[list[str]] = mapped_column(ARRAY(String(64)))
    retention_days: Mapped[int] = mapped_column(Integer)
    minimum_fee_micros: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        CheckConstraint("max_cost_per_run_micros > 0", name="max_cost_positive"),
        CheckConstraint("minimum_fee_micros >= 0", name="minimum_fee_nonneg"),
    )


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    plan_id: Mapped[str] = mapped_column(ForeignKey("plans.id"))
    status: Mapped[str] = mapped_column(String(16), server_default="active")
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())

    __table_args__ = (CheckConstraint("status IN ('active', 'suspended')", name="status"),)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    display_prefix: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(TZ)


class TenantBalance(Base):
    """Cached sums of the ledger, updated in the same transaction as each transfer."""

    __tablename__ = "tenant_balances"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    funding_micros: Mapped[int] = mapped_column(BigInteger, server_default="0")
    available_micros: Mapped[int] = mapped_column(BigInteger, server_default="0")
    held_micros: Mapped[int] = mapped_column(BigInteger, server_default="0")
    spent_micros: Mapped[int] = mapped_column(BigInteger, server_default="0")
    updated_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())

    __table_args__ = (
        CheckConstraint("available_micros >= 0", name="available_nonneg"),
        CheckConstraint("held_micros >= 0", name="held_nonneg"),
        CheckConstraint("spent_micros >= 0", name="spent_nonneg"),
        CheckConstraint(
            "funding_micros + available_micros + held_micros + spent_micros = 0", name="balanced"
        ),
    )


class AdmissionHold(Base):
    """New submissions refused for a scope: 'platform' (paused by hand) or
    'tenant:<id>' (frozen when its money raised an alarm). Deleted to resume."""

    __tablename__ = "admission_holds"

    scope: Mapped[str] = mapped_column(String(80), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    operator: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())

    __table_args__ = (CheckConstraint("kind IN ('pause', 'freeze')", name="kind"),)


class LedgerCheckpoint(Base):
    """The sums of a tenant's transfers up to `transfer_id`, as an audit found them sound.

    The next audit adds only the transfers after it (SPEC §2: its cost follows
    the traffic since, not the history). A tenant's transfer ids commit in
    order (`ledger.post`), so a snapshot that sees one id sees all smaller ones.
    """

    __tablename__ = "ledger_checkpoints"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    transfer_id: Mapped[int] = mapped_column(BigInteger)
    funding_micros: Mapped[int] = mapped_column(BigInteger)
    available_micros: Mapped[int] = mapped_column(BigInteger)
    held_micros: Mapped[int] = mapped_column(BigInteger)
    spent_micros: Mapped[int] = mapped_column(BigInteger)
    checked_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())


ACTIVE = "status IN ('QUEUED', 'PROCESSING')"


class Run(Base):
    __tablename__ = "runs"
    # Server defaults (created_at, version, …) come back in the INSERT's RETURNING,
    # so a submission answers from the row it wrote without reading it again.
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    pack_type: Mapped[str] = mapped_column(String(64))
    pack_version: Mapped[str] = mapped_column(String(32))
    inputs: Mapped[dict] = mapped_column(JSONB)
    # NULL once a submission failed before it was enqueued: the key is given back
    # so the agent's retry with the same key makes a fresh run (docs/api.md).
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    payload_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer, server_default="1")
    finalize_stage: Mapped[str] = mapped_column(String(16), server_default="NONE")
    money_state: Mapped[str] = mapped_column(String(16), server_default="RESERVED")
    reserved_micros: Mapped[int] = mapped_column(BigInteger)
    minimum_fee_micros: Mapped[int] = mapped_column(BigInteger)
    actual_cost_micros: Mapped[int | None] = mapped_column(BigInteger)
    lease_token: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    lease_expires_at: Mapped[datetime | None] = mapped_column(TZ)
    progress: Mapped[float] = mapped_column(Float, server_default="0")
    result_key: Mapped[str | None] = mapped_column(Text)
    retention_until: Mapped[datetime | None] = mapped_column(TZ)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    trace_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(TZ)
    finalize_claimed_at: Mapped[datetime | None] = mapped_column(TZ)
    finished_at: Mapped[datetime | None] = mapped_column(TZ)
    # Re-drive of lost messages (SPEC §3): publishes so far, and when the last one went out.
    enqueue_attempts: Mapped[int] = mapped_column(SmallInteger, server_default="1")
    enqueued_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())

    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_runs_tenant_idempotency"),
        CheckConstraint("status IN ('QUEUED', 'PROCESSING', 'COMPLETED', 'FAILED')", name="status"),
        CheckConstraint("finalize_stage IN ('NONE', 'CLAIMED', 'COMMITTED')", name="finalize_stage"),
        CheckConstraint("money_state IN ('RESERVED', 'SETTLED', 'AUDIT_REQUIRED')", name="money_state"),
        CheckConstraint("reserved_micros >= 0", name="reserved_nonneg"),
        CheckConstraint(
            "actual_cost_micros IS NULL OR (actual_cost_micros >= 0 AND actual_cost_micros <= reserved_micros)",
            name="charge_within_reservation",
        ),
        # Statement pages: a tenant's runs, newest first.
        Index("ix_runs_tenant_created", "tenant_id", text("created_at DESC"), text("id DESC")),
        # Sweeps: each covers only the active runs it looks at.
        Index("ix_runs_queued_created", "created_at", postgresql_where=text("status = 'QUEUED'")),
        Index("ix_runs_queued_enqueued", "enqueued_at", postgresql_where=text("status = 'QUEUED'")),
        Index(
            "ix_runs_processing_lease",
            "lease_expires_at",
            postgresql_where=text("status = 'PROCESSING' AND finalize_stage = 'NONE'"),
        ),
        Index(
            "ix_runs_finalize_claimed",
            "finalize_claimed_at",
            postgresql_where=text("finalize_stage = 'CLAIMED'"),
        ),
        Index(
            "ix_runs_result_retention",
            "retention_until",
            postgresql_where=text("result_key IS NOT NULL"),
        ),
        Index("ix_runs_money_unsettled", "tenant_id", postgresql_where=text("money_state <> 'SETTLED'")),
        Index("ix_runs_tenant_active", "tenant_id", postgresql_where=text(ACTIVE)),
    )


class LedgerTransfer(Base):
    """One immutable movement of money between two of a tenant's accounts."""

    __tablename__ = "ledger_transfers"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    run_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("runs.id"))
    kind: Mapped[str] = mapped_column(String(16))
    debit_account: Mapped[str] = mapped_column(String(16))
    credit_account: Mapped[str] = mapped_column(String(16))
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    memo: Mapped[str | None] = mapped_column(Text)
    # The operator's id for a top-up or adjustment (a payment, a ticket): a retry
    # with the same one finds the first transfer instead of posting a second.
    reference: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())

    __table_args__ = (
        CheckConstraint("amount_micros >= 0", name="amount_nonneg"),
        CheckConstraint("kind IN ('TOPUP', 'RESERVE', 'CHARGE', 'RELEASE', 'ADJUST')", name="kind"),
        CheckConstraint("debit_account <> credit_account", name="two_accounts"),
        # The edges of dpp.domain.ledger.EDGES, so no code path can move money sideways.
        CheckConstraint(
            "(kind = 'TOPUP' AND debit_account = 'funding' AND credit_account = 'available')"
            " OR (kind = 'RESERVE' AND debit_account = 'available' AND credit_account = 'held')"
            " OR (kind = 'CHARGE' AND debit_account = 'held' AND credit_account = 'spent')"
            " OR (kind = 'RELEASE' AND debit_account = 'held' AND credit_account = 'available')"
            " OR kind = 'ADJUST'",
            name="edge",
        ),
        CheckConstraint(
            "(kind IN ('RESERVE', 'CHARGE', 'RELEASE')) = (run_id IS NOT NULL)", name="run_kinds"
        ),
        # SPEC §2: a run has at most one transfer of each kind.
        Index(
            "uq_ledger_transfers_run_kind",
            "run_id",
            "kind",
            unique=True,
            postgresql_where=text("run_id IS NOT NULL"),
        ),
        Index("ix_ledger_transfers_tenant_id", "tenant_id", "id"),
        Index(
            "uq_ledger_transfers_reference",
            "tenant_id",
            "kind",
            "reference",
            unique=True,
            postgresql_where=text("reference IS NOT NULL"),
        ),
    )


class UsageDaily(Base):
    __tablename__ = "usage_daily"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    runs_completed: Mapped[int] = mapped_column(Integer, server_default="0")
    runs_failed: Mapped[int] = mapped_column(Integer, server_default="0")
    charged_micros: Mapped[int] = mapped_column(BigInteger, server_default="0")
    released_micros: Mapped[int] = mapped_column(BigInteger, server_default="0")
