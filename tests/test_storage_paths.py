"""Storage's two paths store the same rows.

On SQLite the hot writes (the spool's group commit, the delivery outcomes, the tracker's hits, the
contact dates they move) run as plain functions on the driver's thread (``storage.direct``); on
PostgreSQL, SQLAlchemy Core statements. Each write below runs on a real SQLite database twice:
once as it runs there, once with the direct path disabled (the path PostgreSQL takes), from the
same starting rows. Every stored row of every table must be the same, and so must what the write
returned.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from core.events import Classification, Event, EventType
from storage import crm, direct
from storage import events as ev
from storage import queue as q
from storage import spool
from storage.engine import make_engine, make_sessionmaker
from storage.migrate import upgrade
from storage.models import Contact
from storage.spool import SpoolEntry, SpoolRecipient, add_entries

AT = datetime(2026, 11, 22, 9, 30, 15, 250, tzinfo=timezone.utc)
NOW = datetime(2026, 11, 22, 9, 30, 16, tzinfo=timezone.utc)
TABLES = ("messages", "recipients", "events", "crm_jobs", "contacts")


def entries(tag: str = "") -> list[SpoolEntry]:
    """A varied batch: tracked and not, logged, a Never Log copy, a DSN, claimed and not, a
    message without recipients, times in another zone, bytes that are not text. ``tag``: in the
    tokens (unique), for a batch spooled beside the seed's."""
    return [
        SpoolEntry(message_id="<a@x>", user="alice", mail_from="alice@example.com", raw=b"A\r\n\r\nbody",
                   recipients=[SpoolRecipient("carol@ext.test", "tokcarol" + tag, True, True, True, ["policy:track"]),
                               SpoolRecipient("dave@ext.test", None, False, False, False,
                                              ["never_log", "x_track:off"], never_log=True)],
                   from_header="Alice <alice@example.com>", subject="Grüße", client_ip="127.0.0.1",
                   log=True, log_associate="deal:7", accepted_at=AT,
                   claim_owner="host:1:abc", lease_until=AT + timedelta(minutes=5)),
        SpoolEntry(message_id="<b@x>", user=None, mail_from="", raw=b"\x00\xff bytes", kind="dsn",
                   recipients=[SpoolRecipient("alice@example.com", None, False, False, False, ["dsn"])],
                   accepted_at=AT.astimezone(timezone(timedelta(hours=2)))),
        SpoolEntry(message_id="<c@x>", user="bob", mail_from="bob@example.com", raw=b"C", recipients=[],
                   log=True, accepted_at=AT),
        SpoolEntry(message_id="<d@x>", user="bob", mail_from="bob@example.com", raw=b"D", accepted_at=AT,
                   recipients=[SpoolRecipient("erin@ext.test", "tokerin" + tag, True, False, True, [])]),
    ]


async def seed(engine) -> None:
    """The starting rows of the writes that need some: the spooled batch (always through the Core
    path, so both runs start alike) and two contacts."""
    with direct.disabled():
        async with engine.begin() as conn:
            await add_entries(conn, entries())
    async with make_sessionmaker(engine)() as s, s.begin():
        s.add_all([Contact(email="carol@ext.test", created_at=AT, last_open_at=AT + timedelta(hours=2)),
                   Contact(email="erin@ext.test", created_at=AT)])


# -- the writes ---------------------------------------------------------------------------------

async def spool_writer(engine):
    """The spool's group commit (its own transaction: on SQLite rows and commit in one trip)."""
    writer = spool.spool_writer(make_sessionmaker(engine))
    writer.start()
    try:
        return [await writer.submit(e) for e in entries("2")]
    finally:
        await writer.stop()


async def spool_add_entries(engine):
    """The spool's rows within a transaction the caller opened."""
    async with engine.begin() as conn:
        return await add_entries(conn, entries("2"))


def outcomes() -> list[q.Outcome]:
    # recipient ids of the seed: 1, 2 (message 1), 3 (message 2, the DSN), 4 (message 4)
    return [q.Outcome(1, 1, "alice", "sent", "250 2.0.0 OK", render_note="tracked", owner="host:1:abc"),
            q.Outcome(2, 1, "alice", "deferred", "451 4.7.1 later", next_attempt_at=AT + timedelta(hours=1),
                      owner="host:1:abc"),
            q.Outcome(3, 2, None, "bounced", "550 5.1.1 no such user " + "x" * 600, dsn_wanted=True, attempts=3),
            q.Outcome(4, 4, "bob", "bounced", "554 5.0.0 Bounced by the operator")]


async def queue_record(engine):
    """Delivery outcomes within a transaction the caller opened, then one more for a copy."""
    async with engine.begin() as conn:
        await q.record(conn, outcomes(), NOW)
    async with engine.begin() as conn:
        await q.record(conn, [q.Outcome(2, 1, "alice", "sent", "250 OK", attempts=2)], NOW + timedelta(seconds=1))


async def queue_record_committed(engine):
    """Delivery outcomes in a transaction of their own (the worker's outcome writer)."""
    await q.record_committed(engine, outcomes(), NOW)


def hit(kind: EventType, recipient: int, message: int, at: float, cls: Classification, key: str, **kw) -> Event:
    return Event(kind, message, at, recipient, kw.pop("user", "alice"), classification=cls, dedupe_key=key, **kw)


async def tracker_hits(engine):
    """A tracker batch: its facts (tokens, human history), then its events and contact dates."""
    t = NOW.timestamp() + 0.1234567
    async with ev.hits(engine) as hits:
        info, history, unknown = await hits.facts({"tokcarol", "tokerin", "nosuchtoken"},
                                                  lambda pks: (set(), set(pks)))
        events = [
            hit(EventType.OPENED, 1, 1, t, Classification.MACHINE, "k.1", reason="apple_privacy_proxy",
                ip="17.0.0.1", user_agent="Mozilla/5.0", client="Apple Mail Privacy Protection"),
            hit(EventType.OPENED, 1, 1, t + 1, Classification.HUMAN, "k.2:open", reason="inferred_from_click",
                first=True, inferred=True, ip="192.0.2.1", user_agent="Firefox", client="Firefox/Linux"),
            hit(EventType.CLICKED, 1, 1, t + 1, Classification.HUMAN, "k.2", url="https://example.com/ü?a=1&b",
                first=True, ip="192.0.2.1", user_agent="Firefox", client="Firefox/Linux"),
            hit(EventType.CLICKED, 4, 4, t + 2, Classification.SELF, "k.3", user="bob", reason="sender_ip",
                url="https://example.com/"),
        ]
        await hits.write(events, {"carol@ext.test": {"last_open_at": t + 1, "last_click_at": t + 1,
                                                     "last_engagement_at": t + 1},
                                  "erin@ext.test": {"last_engagement_at": t + 2},
                                  "nobody@ext.test": {"last_engagement_at": t}})
    async with ev.hits(engine) as hits:  # the same batch again (a retry): nothing twice
        await hits.write(events[:1], {})
    async with ev.hits(engine) as hits:  # the history now found
        _, history_after, _ = await hits.facts({"tokcarol"}, lambda pks: (set(), set(pks)))
    return sorted(info.items()), sorted(history), sorted(unknown), sorted(history_after)


async def write_events(engine):
    """Events written as Events (the relay's, the inbound listener's), and as dicts (the shim)."""
    async with engine.begin() as conn:
        await ev.write_events(conn, [
            Event(EventType.REPLIED, 1, NOW, 1, "alice", classification=Classification.HUMAN, first=True,
                  dedupe_key="reply:1"),
            Event(EventType.OPENED, 1, NOW.astimezone(timezone(timedelta(hours=-5))), 1, "alice",
                  classification=Classification.HUMAN, reason="inferred_from_reply", inferred=True,
                  dedupe_key="reply:1:open")])
        await ev.insert_idempotent(conn, [dict(type="sent", at=NOW, message_pk=4, recipient_pk=4, user="bob",
                                               reason="250 OK"),
                                          dict(type="replied", at=NOW, message_pk=1, dedupe_key="reply:1")])
    async with engine.connect() as conn:
        return sorted(await ev.human_history(conn, {1, 2, 4}))


async def touch_contacts(engine):
    """Contact dates moved forward, never back; an address without a contact skipped."""
    async with engine.begin() as conn:
        await crm.touch_contacts(conn, {"carol@ext.test": {"last_open_at": AT, "last_click_at": NOW},
                                        "erin@ext.test": {"last_engagement_at": NOW},
                                        "nobody@ext.test": {"last_open_at": NOW}})


async def reads(engine):
    """What the hot paths read: tokens, human history, the relay's contact facts."""
    async with engine.connect() as conn:
        return (sorted((await ev.resolve_tokens(conn, {"tokcarol", "tokerin", "x"})).items()),
                sorted(await ev.human_history(conn, {1, 4})),
                sorted(await crm.contact_facts(conn, {"carol@ext.test", "nobody@ext.test"})))


WRITES = [spool_writer, spool_add_entries, queue_record, queue_record_committed, tracker_hits, write_events,
          touch_contacts, reads]


async def stored(url: str, write) -> tuple:
    engine = make_engine(url)
    try:
        await upgrade(engine)
        await seed(engine)
        result = await write(engine)
        rows = {}
        async with engine.connect() as conn:
            for table in TABLES:
                rows[table] = [tuple(r) for r in (await conn.execute(text(f"SELECT * FROM {table} ORDER BY id"))).all()]
        return result, rows
    finally:
        await engine.dispose()


@pytest.mark.parametrize("write", WRITES, ids=[w.__name__ for w in WRITES])
async def test_both_paths_store_the_same_rows(write, tmp_path, monkeypatch):
    monkeypatch.setattr(spool, "utcnow", lambda: NOW)  # the queued events' time
    fast_result, fast = await stored(f"sqlite+aiosqlite:///{tmp_path}/direct.db", write)
    with direct.disabled():
        core_result, core = await stored(f"sqlite+aiosqlite:///{tmp_path}/core.db", write)
    assert fast_result == core_result
    for table in TABLES:
        assert fast[table] == core[table], table
    assert fast != {table: [] for table in TABLES}


async def test_a_lazy_commit_is_not_waited_to_disk_and_the_connection_is_durable_again_after(tmp_path):
    """``direct.transaction(durable=False)`` (the CRM logger's): synchronous=NORMAL for its own
    commit only; the next user of the pooled connection commits with storage.engine's FULL."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/lazy.db")
    try:
        seen = lambda db: db.execute("PRAGMA synchronous").fetchone()[0]  # noqa: E731
        assert await direct.transaction(engine, seen) == 2  # FULL
        assert await direct.transaction(engine, seen, durable=False) == 1  # NORMAL
        assert await direct.transaction(engine, seen) == 2

        def fails(db):
            raise RuntimeError("rolled back")
        with pytest.raises(RuntimeError):
            await direct.transaction(engine, fails, durable=False)
        assert await direct.transaction(engine, seen) == 2
    finally:
        await engine.dispose()
