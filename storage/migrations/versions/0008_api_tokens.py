"""api_tokens: API tokens made in the settings page (hashed), beside the config's

Revision ID: 0008
Revises: 0007
"""
from alembic import op
import sqlalchemy as sa

# The model lives in storage/api_tokens.py (on storage.models' Base): imported here so that whoever
# migrates also has the table in Base.metadata (the schema check compares the two).
import storage.api_tokens  # noqa: F401,E402

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_tokens',
                    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
                    sa.Column('user', sa.String(length=200), nullable=False),
                    sa.Column('name', sa.String(length=100), nullable=False),
                    sa.Column('token_hash', sa.String(length=71), nullable=False),
                    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
                    sa.PrimaryKeyConstraint('id'),
                    sa.UniqueConstraint('token_hash'))
    op.create_index('ix_api_tokens_user', 'api_tokens', ['user'])


def downgrade() -> None:
    op.drop_index('ix_api_tokens_user', table_name='api_tokens')
    op.drop_table('api_tokens')
