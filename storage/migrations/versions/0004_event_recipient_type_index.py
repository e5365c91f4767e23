"""events: (recipient_pk, type, classification) index replaces the recipient_pk one

"Has this recipient had a human open yet?" becomes an index seek instead of a scan of every
event the recipient has.

Revision ID: 0004
Revises: 0003
"""
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_events_recipient_type', 'events', ['recipient_pk', 'type', 'classification'])
    op.drop_index('ix_events_recipient_pk', table_name='events')


def downgrade() -> None:
    op.create_index('ix_events_recipient_pk', 'events', ['recipient_pk'])
    op.drop_index('ix_events_recipient_type', table_name='events')
