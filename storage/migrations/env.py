"""Alembic environment: runs on the connection that storage.migrate hands over."""

from alembic import context

from storage.models import Base
import storage.api_tokens  # noqa: F401  (these tables are on Base.metadata too)
import storage.inbound_proof  # noqa: F401
import storage.sessions  # noqa: F401

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only through storage.migrate
    raise RuntimeError("run migrations with `trackrelay db upgrade`")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
