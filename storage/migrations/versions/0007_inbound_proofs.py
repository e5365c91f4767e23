"""inbound_proofs: what proved each incoming email the inbound listener logged (a reply to one of
the user's messages, the thread of one, our signed per-copy reference, or nothing)

Revision ID: 0007
Revises: 0006
"""
from alembic import op
import sqlalchemy as sa

# The model lives in storage/inbound_proof.py (on storage.models' Base): imported here so that
# whoever migrates also has the table in Base.metadata (the schema check compares the two).
import storage.inbound_proof  # noqa: F401,E402

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

_BIG = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table('inbound_proofs',
                    sa.Column('logged_pk', _BIG, nullable=False, autoincrement=False),
                    sa.Column('proof', sa.String(length=8), nullable=False),
                    sa.Column('message_pk', _BIG, nullable=True),
                    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
                    sa.ForeignKeyConstraint(['logged_pk'], ['logged_emails.id'], ondelete='CASCADE'),
                    sa.ForeignKeyConstraint(['message_pk'], ['messages.id'], ondelete='SET NULL'),
                    sa.PrimaryKeyConstraint('logged_pk'))
    op.create_index('ix_inbound_proofs_message_pk', 'inbound_proofs', ['message_pk'])


def downgrade() -> None:
    op.drop_index('ix_inbound_proofs_message_pk', table_name='inbound_proofs')
    op.drop_table('inbound_proofs')
