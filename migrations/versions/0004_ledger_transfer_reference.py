"""ledger transfers carry an operator's reference (idempotent top-ups and adjustments)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 10:00:00.000000

An operator's top-up or adjustment names the payment or ticket it comes from;
the unique index makes a retry with the same reference unable to move money a
second time, whatever the CLI in front of it does. Run transfers keep NULL
(they are unique per run already).
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('ledger_transfers', sa.Column('reference', sa.String(length=255), nullable=True))
    op.create_index('uq_ledger_transfers_reference', 'ledger_transfers', ['tenant_id', 'kind', 'reference'], unique=True, postgresql_where=sa.text('reference IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('uq_ledger_transfers_reference', table_name='ledger_transfers', postgresql_where=sa.text('reference IS NOT NULL'))
    op.drop_column('ledger_transfers', 'reference')
