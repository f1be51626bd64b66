"""ledger checkpoints: the audit's cost follows the transfers since the last one, not history

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 15:10:00

A checkpoint is the sum of a tenant's transfers up to one transfer id, as an
audit found it sound. The next audit adds the transfers after that id. It is
safe because a tenant's transfer ids commit in order (`ledger.post` locks the
balance row before it takes an id), so a snapshot that sees one id sees every
smaller id of the same tenant.
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'ledger_checkpoints',
        sa.Column('tenant_id', sa.String(length=64), nullable=False),
        sa.Column('transfer_id', sa.BigInteger(), nullable=False),
        sa.Column('funding_micros', sa.BigInteger(), nullable=False),
        sa.Column('available_micros', sa.BigInteger(), nullable=False),
        sa.Column('held_micros', sa.BigInteger(), nullable=False),
        sa.Column('spent_micros', sa.BigInteger(), nullable=False),
        sa.Column('checked_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_ledger_checkpoints_tenant_id_tenants')),
        sa.PrimaryKeyConstraint('tenant_id', name=op.f('pk_ledger_checkpoints')),
    )


def downgrade() -> None:
    op.drop_table('ledger_checkpoints')
