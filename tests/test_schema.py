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


async def _spool_and_settle(url: str) -> dict[str, list[tuple]]:
    """Spool a varied batch, settle one outcome of each kind, and return every stored row."""
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import text

    from storage import queue as q
    from storage.engine import make_engine as mk
    from storage.spool import SpoolEntry, SpoolRecipient, add_entries

    at = datetime(2026, 11, 22, 9, 30, 15, 250, tzinfo=timezone.utc)
    engine = mk(url)
    try:
        await upgrade(engine)
        entries = [
            SpoolEntry(message_id="<a@x>", user="alice", mail_from="alice@example.com", raw=b"A\r\n\r\nbody",
                       recipients=[SpoolRecipient("carol@ext.test", "tok-1", True, True, True, ["default"]),
                                   SpoolRecipient("dave@ext.test", None, False, False, False,
                                                  ["never_log", "x_track:off"], never_log=True)],
                       from_header="Alice <alice@example.com>", subject="Grüße", client_ip="127.0.0.1",
                       log=True, log_associate="deal:7", accepted_at=at,
                       claim_owner="host:1:abc", lease_until=at + timedelta(minutes=5)),
            SpoolEntry(message_id="<b@x>", user=None, mail_from="", raw=b"\x00\xff bytes", kind="dsn",
                       recipients=[SpoolRecipient("alice@example.com", None, False, False, False, ["dsn"])],
                       accepted_at=at.astimezone(timezone(timedelta(hours=2)))),
            SpoolEntry(message_id="<c@x>", user="bob", mail_from="bob@example.com", raw=b"C", recipients=[],
                       log=True, accepted_at=at),
        ]
        async with engine.begin() as conn:
            ids = await add_entries(conn, entries)
        (m1, (r1, r2)), (m2, (r3,)), (m3, ()) = ids
        outcomes = [q.Outcome(r1, m1, "alice", "sent", "250 2.0.0 OK", render_note="tracked"),
                    q.Outcome(r2, m1, "alice", "deferred", "451 4.7.1 later", next_attempt_at=at + timedelta(hours=1)),
                    q.Outcome(r3, m2, None, "bounced", "550 5.1.1 no such user", dsn_wanted=True, attempts=3)]
        async with engine.begin() as conn:
            await q.record(conn, outcomes, at + timedelta(seconds=2))
        async with engine.begin() as conn:
            await q.record(conn, [q.Outcome(r2, m1, "alice", "sent", "250 OK", attempts=2)],
                           at + timedelta(seconds=3))
        rows = {}
        async with engine.connect() as conn:
            for table in ("messages", "recipients", "events", "crm_jobs"):
                rows[table] = [tuple(r) for r in (await conn.execute(text(f"SELECT * FROM {table} ORDER BY id"))).all()]
        return rows
    finally:
        await engine.dispose()


async def test_spool_and_outcomes_store_the_same_rows_on_sqlites_direct_path(tmp_path, monkeypatch):
    """On SQLite the spool and the delivery outcomes are written by plain functions on the driver's
    thread: every stored value must be the one SQLAlchemy's Core statements store."""
    from datetime import datetime, timezone

    from storage import direct, spool

    monkeypatch.setattr(spool, "utcnow", lambda: datetime(2026, 11, 22, 9, 30, 16, tzinfo=timezone.utc))
    fast = await _spool_and_settle(f"sqlite+aiosqlite:///{tmp_path}/direct.db")
    monkeypatch.setattr(direct, "usable", lambda conn: False)
    core = await _spool_and_settle(f"sqlite+aiosqlite:///{tmp_path}/core.db")
    for table in core:
        assert fast[table] == core[table], table
    assert len(core["messages"]) == 3 and len(core["recipients"]) == 3 and len(core["crm_jobs"]) == 2
    assert len(core["events"]) == 7  # 3 queued, sent, deferred, bounced, sent
    done = {row[0]: row[13] for row in core["messages"]}  # done_at
    assert done[1] is not None and done[2] is not None and done[3] is None
