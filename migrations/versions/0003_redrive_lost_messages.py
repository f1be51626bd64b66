"""re-drive lost messages: a run's publish attempts and the time of the last one

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 13:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A constant default: existing rows take it without a table rewrite.
    op.add_column('runs', sa.Column('enqueue_attempts', sa.SmallInteger(), server_default='1', nullable=False))
    # now() is stable within the migration's transaction: one value, no rewrite either.
    op.add_column('runs', sa.Column('enqueued_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                                    nullable=False))
    op.execute("UPDATE runs SET enqueued_at = created_at WHERE status = 'QUEUED'")
    op.create_index('ix_runs_queued_enqueued', 'runs', ['enqueued_at'], unique=False,
                    postgresql_where=sa.text("status = 'QUEUED'"))


def downgrade() -> None:
    op.drop_index('ix_runs_queued_enqueued', table_name='runs', postgresql_where=sa.text("status = 'QUEUED'"))
    op.drop_column('runs', 'enqueued_at')
    op.drop_column('runs', 'enqueue_attempts')
