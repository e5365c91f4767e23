"""sessions: the pages' sign-in sessions, server-side so that logout and a password change end them

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa

# The model lives in storage/sessions.py (on storage.models' Base): imported here so that whoever
# migrates also has the table in Base.metadata (the schema check compares the two).
import storage.sessions  # noqa: F401,E402

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('sessions',
                    sa.Column('id', sa.String(length=64), nullable=False),
                    sa.Column('user', sa.String(length=200), nullable=False),
                    sa.Column('password_tag', sa.String(length=64), nullable=False),
                    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
                    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
                    sa.PrimaryKeyConstraint('id'))
    op.create_index('ix_sessions_user', 'sessions', ['user'])


def downgrade() -> None:
    op.drop_index('ix_sessions_user', table_name='sessions')
    op.drop_table('sessions')
