"""Events (``core.events.Event``): written (``write_events``; the tracker's batches through
``hits``), read back in commit order (``events_after``), and what the writers must know first
(tokens, human history).

On SQLite the hot ones run in one trip to its thread (``storage.direct``, private to storage):
callers never know which path ran. Each query is written once for both paths where the two
differ only in how they are sent (the token and history look-ups, the event INSERT)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple

from sqlalchemy import Boolean, and_, bindparam, func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from core import events as em
from core.events import Classification
from storage import crm, direct
from storage.engine import connection_of
from storage.models import Event, Message, Recipient, UTCDateTime, utcnow


# sqlite3 binds an exact int, float, str or bytes at once; anything else (None, a bool, a str-valued
# enum member) goes through its adaptation first, which looks for a registered adapter, then for
# ``__adapt__`` and ``__conform__`` — two AttributeErrors formatted and cleared per parameter, about
# 3,300 instructions each: a tracker event row has four to six such parameters (its type and
# classification, ``first``, ``inferred``, its NULLs), ~20,000 of the ~94,000 instructions its
# recording cost (callgrind, bench/tracker_cost.py). Adapters for these types are found by the first
# look-up and give what sqlite3 bound before: None as NULL ({}.get(None) is None: a C call, no
# Python frame), a bool as its int, an enum member as its text. Process-wide, for every sqlite3
# connection (the relay's spool and outcomes gain too); the values stored do not change.
sqlite3.register_adapter(type(None), {}.get)
sqlite3.register_adapter(bool, int)
for _enum in (em.EventType, em.Classification):
    sqlite3.register_adapter(_enum, str)


class TokenInfo(NamedTuple):
    """A token's copy, as the tracker's batches need it: one per token of a batch, and real traffic
    brings about one token per hit (a NamedTuple: 0.3 µs to build against a frozen dataclass's 1.7)."""

    recipient_pk: int
    message_pk: int
    address: str
    user: str | None
    client_ip: str | None
    accepted_at: datetime
    sent_at: datetime | None
    never_log: bool


#: The tokens' copies, written once for both paths: ``({in})`` the IN list (``direct.select_in`` on
#: SQLite; an expanding parameter, which brings its own parentheses, elsewhere).
_TOKENS_SQL = ('SELECT r.token, r.id, r.message_pk, r.address, m."user", m.client_ip, m.accepted_at, r.sent_at, '
               "r.never_log FROM recipients r JOIN messages m ON m.id = r.message_pk WHERE r.token IN ({in})")
_TOKENS = (text(_TOKENS_SQL.replace("({in})", ":values")).bindparams(bindparam("values", expanding=True))
           .columns(accepted_at=UTCDateTime(), sent_at=UTCDateTime(), never_log=Boolean()))


async def resolve_tokens(session: AsyncSession | AsyncConnection, tokens: set[str]) -> dict[str, TokenInfo]:
    if not tokens:
        return {}
    conn = await connection_of(session)
    if direct.usable(conn):
        return await direct.run(conn, resolve_tokens_sqlite, list(tokens))
    rows = await conn.execute(_TOKENS, {"values": list(tokens)})
    return {r[0]: TokenInfo(*r[1:]) for r in rows.all()}


def resolve_tokens_sqlite(db: direct.Db, tokens: list[str]) -> dict[str, TokenInfo]:
    rows = direct.select_in(db, _TOKENS_SQL, tokens)
    return {token: TokenInfo(rid, mpk, address, user, ip, direct.parse_time(accepted), direct.parse_time(sent),
                             bool(never_log))
            for token, rid, mpk, address, user, ip, accepted, sent, never_log in rows}


#: Whether each recipient has a human event of each ENGAGEMENT type: one EXISTS per pair, written
#: once for both paths (``{in}`` as in _TOKENS_SQL).
_HUMAN_SQL = "SELECT r.id, " + ", ".join(
    f"EXISTS (SELECT 1 FROM events e WHERE e.recipient_pk = r.id AND e.type = '{k}' "
    f"AND e.classification = '{Classification.HUMAN}')" for k in em.ENGAGEMENT) + " FROM recipients r WHERE r.id IN ({in})"
_HUMAN = text(_HUMAN_SQL.replace("({in})", ":values")).bindparams(bindparam("values", expanding=True))


async def human_history(session: AsyncSession | AsyncConnection, recipient_pks: set[int]) -> set[tuple[int, str]]:
    """(recipient, type) pairs that already have a human event: for `first` and inferred opens.

    One EXISTS per pair, each an index seek on ``ix_events_recipient_type``: the cost does not
    grow with the number of events a recipient already has."""
    if not recipient_pks:
        return set()
    conn = await connection_of(session)
    if direct.usable(conn):
        rows = await direct.run(conn, human_history_sqlite, sorted(recipient_pks))
    else:
        rows = (await conn.execute(_HUMAN, {"values": sorted(recipient_pks)})).all()
    return human_pairs(rows)


def human_pairs(rows) -> set[tuple[int, str]]:
    """(recipient id, has opened, has clicked, has replied) rows as (recipient, type) pairs."""
    return {(r[0], k) for r in rows for k, has in zip(em.ENGAGEMENT, r[1:]) if has}


def human_history_sqlite(db: direct.Db, pks: list[int]) -> list[tuple]:
    return direct.select_in(db, _HUMAN_SQL, pks)


#: The columns an event is written with (``core.events.COLUMNS``: ``Event.as_row``'s order).
EVENT_COLUMNS = em.COLUMNS
_INSERT_SQL: dict[str, str] = {}


def insert_sql(dialect) -> str:
    """The driver-level INSERT of one event (parameters in EVENT_COLUMNS order), the one
    statement both paths write events with."""
    sql = _INSERT_SQL.get(dialect.name)
    if sql is None:
        cols = ", ".join(dialect.identifier_preparer.quote(c) for c in EVENT_COLUMNS)
        if dialect.paramstyle == "qmark":
            marks = ", ".join("?" for _ in EVENT_COLUMNS)
        elif dialect.paramstyle == "numeric_dollar":
            marks = ", ".join(f"${i}" for i in range(1, len(EVENT_COLUMNS) + 1))
        else:  # pragma: no cover - the two drivers we ship use one of the above
            raise NotImplementedError(dialect.paramstyle)
        sql = _INSERT_SQL[dialect.name] = (f"INSERT INTO events ({cols}) VALUES ({marks}) "
                                           "ON CONFLICT (dedupe_key) DO NOTHING")
    return sql


sqlite_time = direct.sqlite_time


def _aware_utc(at: datetime) -> datetime:
    return at.astimezone(timezone.utc)


def time_param(dialect):
    """How a timezone-aware datetime goes to the driver (``Event.as_row``'s ``stamp``)."""
    return sqlite_time if dialect.name == "sqlite" else _aware_utc


def _epoch_utc(at: float) -> datetime:
    return datetime.fromtimestamp(at, timezone.utc)


def epoch_param(dialect):
    """How epoch seconds (the tracker's hit times) go to the driver."""
    return direct.sqlite_epoch if dialect.name == "sqlite" else _epoch_utc


def stamp_of(dialect):
    """How an Event's ``at`` (a datetime or epoch seconds) goes to the driver."""
    dt, epoch = time_param(dialect), epoch_param(dialect)
    return lambda at: dt(at) if isinstance(at, datetime) else epoch(at)


async def _insert_rows(conn: AsyncConnection, rows: list[tuple]) -> None:
    """Events as ``Event.as_row`` gives them, in one driver-level executemany: no ORM, no per-row
    statement compilation. A row whose dedupe_key is already stored is skipped: a retried batch
    writes nothing twice."""
    if rows:
        if direct.usable(conn):
            await direct.run(conn, _executemany, insert_sql(conn.dialect), rows)
        else:
            await conn.exec_driver_sql(insert_sql(conn.dialect), rows)


def _executemany(db: direct.Db, sql: str, rows: list[tuple]) -> None:
    db.executemany(sql, rows)


async def write_events(session: AsyncSession | AsyncConnection, events: Iterable[em.Event]) -> None:
    """Store these events (``core.events.Event``) in one executemany; one whose ``dedupe_key`` is
    already stored is skipped, so a retried batch writes nothing twice."""
    conn = await connection_of(session)
    await _insert_rows(conn, em.rows(events, stamp_of(conn.dialect)))


async def insert_idempotent(session: AsyncSession | AsyncConnection, rows: list[dict]) -> None:
    """``write_events`` for events given as dicts of their columns: missing keys are NULL, ``at``
    defaults to now, ``first``/``inferred`` to false.

    A shim, kept for the callers that still give dicts (tests/test_schema.py; relay/inbound.py,
    which it was kept for, builds ``core.events.Event`` now): new code calls ``write_events``."""
    if rows:
        now = utcnow()
        await write_events(session, [em.Event(
            type=r["type"], at=r.get("at") or now, message_pk=r["message_pk"], recipient_pk=r.get("recipient_pk"),
            user=r.get("user"), url=r.get("url"), ip=r.get("ip"), user_agent=r.get("user_agent"),
            client=r.get("client"), classification=r.get("classification"), reason=r.get("reason"),
            first=bool(r.get("first")), inferred=bool(r.get("inferred")), dedupe_key=r.get("dedupe_key"))
            for r in rows])


# -- the tracker's batches ------------------------------------------------------------------------

#: A batch's facts: its tokens resolved, the human history of their recipients (memory's and the
#: database's), and the recipients whose history was asked of the database.
HitFacts = tuple[dict[str, TokenInfo], set[tuple[int, str]], set[int]]
#: What memory knows of some recipients' history: (the pairs it holds, the recipients to ask about).
KnownHistory = Callable[[set[int]], tuple[set[tuple[int, str]], set[int]]]


class Hits:
    """One batch of the tracker's opens and clicks: ``facts`` first, then ``write``; from
    ``hits(engine)``. On SQLite each is one trip to its thread with its own commit (the facts are
    reads); elsewhere both run in one transaction, committed when the ``async with`` ends."""

    def __init__(self, engine: AsyncEngine, conn: AsyncConnection | None):
        self._engine = engine
        self._conn = conn

    async def facts(self, tokens: set[str], known: KnownHistory) -> HitFacts:
        """The tokens resolved, and their recipients' human history: ``known(recipient_pks)``
        says what memory holds and whom to ask; only those are asked of the database."""
        if self._conn is None:
            return await direct.transaction(self._engine, _hit_facts_sqlite, list(tokens), known)
        info = await resolve_tokens(self._conn, tokens)
        history, unknown = known({i.recipient_pk for i in info.values()})
        if unknown:
            history |= await human_history(self._conn, unknown)
        return info, history, unknown

    async def write(self, events: list[em.Event], dates: dict[str, dict[str, float]]) -> None:
        """Store the batch's events (``at`` in epoch seconds) and move the contact dates their human
        events move (``storage.crm.touch_contacts``: epoch seconds, by lower-cased address)."""
        if self._conn is None:
            epoch = direct.sqlite_epoch
            await direct.transaction(self._engine, _write_hits_sqlite, insert_sql(self._engine.dialect),
                                     sqlite_rows(events, epoch), _stamped(dates, epoch))
            return
        await _insert_rows(self._conn, em.rows(events, epoch_param(self._conn.dialect)))
        if dates:
            await crm.touch_contacts(self._conn, _stamped(dates, _epoch_utc))


@asynccontextmanager
async def hits(engine: AsyncEngine) -> AsyncIterator[Hits]:
    """A batch of tracker hits (``Hits``) on a bare connection of ``engine``: no ORM."""
    if direct.usable(engine):
        yield Hits(engine, None)
        return
    async with engine.begin() as conn:
        yield Hits(engine, conn)


def sqlite_rows(events: Iterable[em.Event], stamp) -> list[tuple]:
    """``core.events.rows`` as sqlite3 binds them without its adaptation step: the type and
    classification as plain str, ``first`` and ``inferred`` as 0/1 (what the adapters above, and
    SQLAlchemy's Boolean, give); ~150 instructions a value here against ~1,400 through an adapter."""
    return [(str(kind), stamp(at), message_pk, recipient_pk, user, url, ip, user_agent, client,
             None if classification is None else str(classification), reason, 1 if first else 0,
             1 if inferred else 0, dedupe_key)
            for (kind, message_pk, at, recipient_pk, user, url, ip, user_agent, client, classification, reason,
                 first, inferred, dedupe_key, _id, _txid, _message_id, _recipient) in events]


def _stamped(dates: dict[str, dict[str, float]], stamp) -> dict:
    """Contact dates in epoch seconds as ``stamp`` gives them."""
    return {address: {name: stamp(at) for name, at in moved.items()} for address, moved in dates.items()}


def _hit_facts_sqlite(db: direct.Db, tokens: list[str], known: KnownHistory) -> HitFacts:
    """``Hits.facts`` on SQLite's thread."""
    info = resolve_tokens_sqlite(db, tokens)
    history, unknown = known({i.recipient_pk for i in info.values()})
    if unknown:
        history |= human_pairs(human_history_sqlite(db, sorted(unknown)))
    return info, history, unknown


def _write_hits_sqlite(db: direct.Db, events_sql: str, rows: list[tuple], dates: dict[str, dict[str, str]]) -> None:
    """``Hits.write`` on SQLite's thread."""
    db.executemany(events_sql, rows)
    if dates:
        crm.touch_contacts_sqlite(db, dates)


@dataclass(frozen=True, order=True)
class Cursor:
    """A position in the event log in commit order: (writing transaction, id).

    On PostgreSQL ids are handed out before commit, so several writers can commit them out of
    order; a reader only sees events of transactions older than every one still running
    (``txid_snapshot_xmin``) and orders by (txid, id), so nothing can later appear before a
    cursor it has passed. On SQLite the single writer commits in id order: txid is 0."""

    txid: int = 0
    id: int = 0

    def __str__(self) -> str:
        return f"{self.txid}.{self.id}"


def parse_cursor(text: str | None) -> Cursor | None:
    """``T.I`` (a cursor) or ``I`` (an event id, looked up later). None for malformed input."""
    if text is None or text == "":
        return Cursor()
    t, dot, i = text.partition(".")
    if dot and t.isdigit() and i.isdigit() and len(text) < 40:
        return Cursor(int(t), int(i))
    if not dot and t.isdigit() and len(t) < 20:
        return Cursor(-1, int(t))  # an id: its txid is looked up
    return None


async def resolve_cursor(session: AsyncSession, cursor: Cursor) -> Cursor:
    if cursor.txid != -1:
        return cursor
    if session.bind.dialect.name != "postgresql":
        return Cursor(0, cursor.id)
    txid = (await session.execute(select(Event.txid).where(Event.id == cursor.id))).scalar()
    if txid is None:  # unknown id: everything committed up to it, by id
        txid = (await session.execute(select(func.max(Event.txid)).where(Event.id <= cursor.id))).scalar() or 0
    return Cursor(txid, cursor.id)


async def events_after(session: AsyncSession, user: str | None, cursor: Cursor, limit: int,
                       message_pk: int | None = None) -> list[em.Event]:
    """Events after ``cursor`` in commit order, of ``user``'s messages (None: everybody's), as
    ``core.events.Event`` records with their Message-ID and recipient address."""
    cursor = await resolve_cursor(session, cursor)
    cond = []
    if session.bind.dialect.name == "postgresql":
        order = (Event.txid, Event.id)
        cond += [or_(Event.txid > cursor.txid, and_(Event.txid == cursor.txid, Event.id > cursor.id)),
                 Event.txid < func.txid_snapshot_xmin(func.txid_current_snapshot())]
    else:
        order = (Event.id,)
        cond.append(Event.id > cursor.id)
    if user is not None:
        cond.append(Event.user == user)
    if message_pk is not None:
        cond.append(Event.message_pk == message_pk)
    rows = await session.execute(
        select(Event, Message.message_id, Recipient.address)
        .join(Message, Message.id == Event.message_pk)
        .outerjoin(Recipient, Recipient.id == Event.recipient_pk)
        .where(and_(*cond)).order_by(*order).limit(limit))
    return [em.Event.from_row(e, message_id, recipient) for e, message_id, recipient in rows.all()]


def cursor_of(event: Event | em.Event) -> Cursor:
    return Cursor(event.txid or 0, event.id)


async def latest_cursor(session: AsyncSession, user: str | None) -> Cursor:
    """The cursor after the last event visible now (where a new reader starts)."""
    cond = [Event.user == user] if user is not None else []
    if session.bind.dialect.name == "postgresql":
        cond.append(Event.txid < func.txid_snapshot_xmin(func.txid_current_snapshot()))
        row = (await session.execute(select(Event.txid, Event.id).where(*cond)
                                     .order_by(Event.txid.desc(), Event.id.desc()).limit(1))).first()
        return Cursor(row[0], row[1]) if row else Cursor()
    last = (await session.execute(select(func.max(Event.id)).where(*cond))).scalar()
    return Cursor(0, last or 0)


async def erase_raw_before(session: AsyncSession, cutoff: datetime) -> int:
    """privacy.event_retention_days: the raw IP and user agent of older events are erased."""
    from sqlalchemy import update
    res = await session.execute(update(Event).where(Event.at < cutoff, or_(Event.ip.is_not(None),
                                                                           Event.user_agent.is_not(None)))
                                .values(ip=None, user_agent=None).execution_options(synchronize_session=False))
    return res.rowcount or 0
