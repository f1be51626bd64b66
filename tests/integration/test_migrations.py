"""The Alembic history: upgrade -> downgrade to base -> upgrade, then no drift."""
import uuid

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url


@pytest.fixture
def scratch_url(settings):
    url = make_url(settings.database_url)
    name = f"dpp_mig_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield url.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _config(url: str) -> Config:
    cfg = Config("alembic.ini")
    cfg.attributes["url"] = url
    return cfg


def test_upgrade_downgrade_upgrade_leaves_no_drift(scratch_url):
    cfg = _config(scratch_url)
    command.upgrade(cfg, "head")
    command.downgrade(cfg, "base")
    engine = create_engine(scratch_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    command.upgrade(cfg, "head")
    command.check(cfg)  # raises when the models and the migrated schema differ

    insp = inspect(engine)
    assert "uq_runs_tenant_idempotency" in {c["name"] for c in insp.get_unique_constraints("runs")}
    indexes = {i["name"]: i for i in insp.get_indexes("runs")}
    for partial in ("ix_runs_queued_created", "ix_runs_processing_lease", "ix_runs_finalize_claimed"):
        assert indexes[partial]["dialect_options"].get("postgresql_where"), partial
    transfer_indexes = {i["name"]: i for i in insp.get_indexes("ledger_transfers")}
    assert transfer_indexes["uq_ledger_transfers_run_kind"]["unique"]
    by_reference = transfer_indexes["uq_ledger_transfers_reference"]
    assert by_reference["unique"] and by_reference["column_names"] == ["tenant_id", "kind", "reference"]
    assert by_reference["dialect_options"].get("postgresql_where")
    engine.dispose()
