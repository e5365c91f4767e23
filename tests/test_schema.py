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


async def test_events_written_by_the_driver_path_store_times_as_the_orm_does(db_url):
    """The tracker writes events without the ORM: the stored time must be the ORM's very format
    (on SQLite, text compared as text by every date filter)."""
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import text

    from storage import events as ev
    from storage.engine import make_sessionmaker
    from storage.models import Event, Message

    engine = make_engine(db_url)
    try:
        await upgrade(engine)
        sm = make_sessionmaker(engine)
        whole = datetime(2026, 11, 22, 10, 0, 0, tzinfo=timezone.utc)
        times = [whole, whole.replace(microsecond=5), whole.astimezone(timezone(timedelta(hours=-5)))]
        async with sm() as s, s.begin():
            m = Message(message_id="<t@x>", mail_from="a@example.com", size=1)
            s.add(m)
            await s.flush()
            for i, at in enumerate(times):
                s.add(Event(type="sent", at=at, message_pk=m.id, dedupe_key=f"orm{i}"))
            await s.flush()
            await ev.insert_idempotent(s, [dict(type="sent", at=at, message_pk=m.id, dedupe_key=f"drv{i}")
                                           for i, at in enumerate(times)])
            await ev.insert_idempotent(s, [dict(type="sent", at=times[0], message_pk=m.id, dedupe_key="drv0")])
        async with sm() as s:
            raw = (await s.execute(text("SELECT dedupe_key, at FROM events ORDER BY id"))).all()
            assert len(raw) == 6  # the repeated dedupe key wrote nothing
            stored = dict(raw)
            for i in range(3):
                assert stored[f"drv{i}"] == stored[f"orm{i}"]
            got = (await s.execute(text("SELECT count(*) FROM events WHERE at < :t"),
                                   {"t": ev.time_param(s.bind.dialect)(whole.replace(microsecond=1))})).scalar()
            assert got == 4  # the whole-second ones (two of them at the same instant), both paths
    finally:
        await engine.dispose()


async def test_contact_dates_only_move_forward(db_url):
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import select

    from storage import crm
    from storage.engine import make_sessionmaker
    from storage.models import Contact

    engine = make_engine(db_url)
    try:
        await upgrade(engine)
        sm = make_sessionmaker(engine)
        t0 = datetime(2026, 11, 22, 10, 0, tzinfo=timezone.utc)
        async with sm() as s, s.begin():
            s.add(Contact(email="carol@ext.test"))
            s.add(Contact(email="dave@ext.test", last_open_at=t0 + timedelta(hours=1)))
        async with sm() as s, s.begin():
            await crm.touch_contacts(s, {
                "carol@ext.test": {"last_click_at": t0, "last_engagement_at": t0},
                "dave@ext.test": {"last_open_at": t0, "last_engagement_at": t0},  # older open: kept
                "nobody@ext.test": {"last_open_at": t0}})  # no contact: nothing created
        async with sm() as s, s.begin():
            await crm.touch_contacts(s, {"carol@ext.test": {"last_engagement_at": t0 - timedelta(days=1),
                                                           "last_open_at": t0 + timedelta(seconds=1)}})
        async with sm() as s:
            got = {c.email: (c.last_open_at, c.last_click_at, c.last_engagement_at)
                   for c in (await s.scalars(select(Contact))).all()}
        assert got == {"carol@ext.test": (t0 + timedelta(seconds=1), t0, t0),
                       "dave@ext.test": (t0 + timedelta(hours=1), None, t0)}
    finally:
        await engine.dispose()
