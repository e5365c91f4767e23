"""Alembic environment: runs on the connection that storage.migrate hands over."""

from alembic import context

from storage.models import Base
import storage.sessions  # noqa: F401  (its table is on Base.metadata too)

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only through storage.migrate
    raise RuntimeError("run migrations with `trackrelay db upgrade`")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
