"""events.txid for a cursor in commit order; webhook delivery cursors

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('txid', sa.BigInteger(), nullable=True,
                                      server_default=sa.text('txid_current()') if postgres else None))
    if postgres:
        op.create_index('ix_events_txid_id', 'events', ['txid', 'id'])
    op.create_table('webhook_cursors',
                    sa.Column('url', sa.String(length=2000), nullable=False),
                    sa.Column('cursor', sa.String(length=64), nullable=False),
                    sa.Column('failing_since', sa.DateTime(timezone=True), nullable=True),
                    sa.Column('attempts', sa.Integer(), nullable=False),
                    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
                    sa.Column('delivered', sa.BigInteger(), nullable=False),
                    sa.Column('given_up', sa.BigInteger(), nullable=False),
                    sa.Column('lease_owner', sa.String(length=100), nullable=True),
                    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
                    sa.PrimaryKeyConstraint('url'))


def downgrade() -> None:
    op.drop_table('webhook_cursors')
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index('ix_events_txid_id', table_name='events')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_column('txid')
