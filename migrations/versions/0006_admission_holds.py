"""admission holds: the platform paused by hand, a tenant frozen on a money alarm

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 16:00:00

A row refuses new submissions for its scope ('platform', or 'tenant:<id>')
until it is deleted; it survives restarts because it lives here. Runs in
flight, GETs and sweeps are not affected.
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'admission_holds',
        sa.Column('scope', sa.String(length=80), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('operator', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.CheckConstraint("kind IN ('pause', 'freeze')", name=op.f('ck_admission_holds_kind')),
        sa.PrimaryKeyConstraint('scope', name=op.f('pk_admission_holds')),
    )


def downgrade() -> None:
    op.drop_table('admission_holds')
