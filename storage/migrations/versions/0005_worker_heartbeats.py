"""worker_heartbeats: one row per running delivery worker, so its claims are freed when it dies

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('worker_heartbeats',
                    sa.Column('owner', sa.String(length=100), nullable=False),
                    sa.Column('hostname', sa.String(length=255), nullable=False),
                    sa.Column('machine', sa.String(length=200), nullable=False),
                    sa.Column('pid', sa.Integer(), nullable=False),
                    sa.Column('pid_started', sa.String(length=32), nullable=False),
                    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
                    sa.Column('beat_at', sa.DateTime(timezone=True), nullable=False),
                    sa.Column('beats', sa.BigInteger(), nullable=False),
                    sa.PrimaryKeyConstraint('owner'))


def downgrade() -> None:
    op.drop_table('worker_heartbeats')
