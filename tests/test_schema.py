"""The Alembic migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from storage.engine import make_engine
from storage.migrate import upgrade
from storage.models import Base


#: Built by a migration on PostgreSQL only, not declared in the models: the commit-order cursor
#: of the event log (migration 0003; SQLite's single writer commits in id order).
POSTGRES_ONLY = {"ix_events_txid_id"}


def _include(obj, name, type_, reflected, compare_to) -> bool:
    return not (type_ == "index" and name in POSTGRES_ONLY)


def _differences(connection) -> list:
    ctx = MigrationContext.configure(connection, opts={"compare_type": False, "include_object": _include})
    return compare_metadata(ctx, Base.metadata)


async def test_migrations_match_the_models(db_url):
    engine = make_engine(db_url)
    try:
        await upgrade(engine)
        async with engine.connect() as conn:
            diff = await conn.run_sync(_differences)
    finally:
        await engine.dispose()
    assert diff == []


async def test_migrations_downgrade_to_the_start_and_back(db_url):
    from alembic import command
    from storage.migrate import alembic_config

    def down(connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "base")

    engine = make_engine(db_url)
    try:
        await upgrade(engine)
        async with engine.begin() as conn:
            await conn.run_sync(down)
        await upgrade(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_differences) == []
    finally:
        await engine.dispose()
