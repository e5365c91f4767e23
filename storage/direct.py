"""A whole batch in one trip to SQLite's thread, for the few writes that run per message.

aiosqlite runs every call on its own thread, and SQLAlchemy's adapter makes one round trip there
per execute, per fetch and per commit; each trip wakes the event loop through its self-pipe, and
each statement costs SQLAlchemy's per-statement and per-row work. The spool's group commit and the
delivery outcomes and the tracker's events run several statements per batch many times a second:
on SQLite they run here as one plain function on the ``sqlite3`` connection, inside that
connection's thread — either within a transaction the caller opened with SQLAlchemy (``run``),
with its own commit in the same trip (``transaction``), or alone on a pooled connection (``call``).

Only SQLite goes this way (``usable``); PostgreSQL keeps the callers' SQLAlchemy Core path. Values
are bound exactly as SQLAlchemy binds them on SQLite (``tests/test_storage_paths.py`` runs every
write of this path both ways, the second time under ``disabled()``, and compares the stored rows).

Private to ``storage``: the functions of storage's modules pick the path themselves; their callers
never know which ran.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable, Sequence, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

T = TypeVar("T")


_disabled = 0


def usable(db: AsyncConnection | AsyncEngine) -> bool:
    """Whether this connection (or engine) is SQLite through aiosqlite (and the path not
    ``disabled``)."""
    return not _disabled and db.dialect.name == "sqlite" and db.dialect.driver == "aiosqlite"


@contextmanager
def disabled() -> Iterator[None]:
    """Within: every storage function takes its SQLAlchemy Core path, as on PostgreSQL, also on
    SQLite (for the tests that compare both paths' rows). Process-wide, not per task."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


async def run(conn: AsyncConnection, fn: Callable[..., T], *args: Any) -> T:
    """``fn(sqlite3_connection, *args)`` on the connection's own thread, in one trip.

    Uses aiosqlite's ``_execute`` (how its own ``execute_fetchall`` runs): the function queued on
    the thread that owns the ``sqlite3`` connection."""
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    return await driver._execute(fn, driver._conn, *args)


async def transaction(engine: AsyncEngine, fn: Callable[..., T], *args: Any, durable: bool = True) -> T:
    """``fn(sqlite3_connection, *args)`` and its commit (or rollback, if it raised) in one trip.

    The connection comes from the engine's pool outside any SQLAlchemy transaction; the engine
    must not roll back on return (``storage.engine.make_engine`` sets that for SQLite).

    ``durable=False``: the commit does not wait for the disk (``synchronous=NORMAL`` for it), for
    work that is done again when it is lost — the CRM logger's, whose job stays pending in the same
    transaction. A process crash loses nothing either way (the WAL is written before the commit
    returns); a power loss may lose such a commit, but never one made after it (the next durable
    commit's fsync of the WAL carries the earlier frames too). It keeps SQLite's one writer from
    waiting on an fsync of background work while the spool's commits queue behind it."""
    return await call(engine, _committed if durable else _committed_lazily, fn, *args)


async def call(engine: AsyncEngine, fn: Callable[..., T], *args: Any) -> T:
    """``fn(sqlite3_connection, *args)`` in one trip on a connection of the engine's pool, outside
    any SQLAlchemy transaction (nothing committed: for reads, or for ``transaction``).

    The pooled DBAPI connection itself, not a SQLAlchemy Connection around it: the checkout and
    check-in of a Connection (greenlets, a task to shield its close) cost as much as the trip."""
    pooled = await engine.raw_connection()
    try:
        driver = pooled.driver_connection
        return await driver._execute(fn, driver._conn, *args)
    finally:
        pooled.close()  # back to the pool (SQLite's engines reset nothing on return)


def _committed_lazily(db: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> T:
    db.execute("PRAGMA synchronous=NORMAL")
    try:
        return _committed(db, fn, *args)
    finally:
        db.execute("PRAGMA synchronous=FULL")  # storage.engine's setting, for the next user


def _committed(db: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> T:
    try:
        result = fn(db, *args)
    except BaseException:
        db.rollback()
        raise
    db.commit()
    return result


def insert_sql(table: str, columns: Sequence[str]) -> str:
    cols = ", ".join(f'"{c}"' for c in columns)
    return f'INSERT INTO "{table}" ({cols}) VALUES ({", ".join("?" for _ in columns)})'


def json_text(value: Any) -> str:
    """A JSON column's value as SQLAlchemy stores it on SQLite (``json.dumps``, default options)."""
    return json.dumps(value)


#: Parameters per statement, well under SQLite's limit (32,766 since 3.32; 999 before).
MAX_PARAMS = 900


def in_list(n: int) -> str:
    return ", ".join("?" for _ in range(n))


def select_in(db: sqlite3.Connection, sql: str, values: Sequence[Any]) -> list[tuple]:
    """Rows of ``sql`` whose ``{in}`` is an IN list of ``values``, run in chunks of MAX_PARAMS."""
    rows: list[tuple] = []
    for i in range(0, len(values), MAX_PARAMS):
        chunk = values[i:i + MAX_PARAMS]
        rows += db.execute(sql.format(**{"in": in_list(len(chunk))}), chunk).fetchall()
    return rows


def sqlite_time(at: datetime) -> str:
    """A datetime as SQLAlchemy stores UTCDateTime on SQLite (naive UTC text, microseconds always)."""
    if at.tzinfo is timezone.utc:  # the usual case (utcnow): no conversion
        return at.isoformat(" ", "microseconds")[:26]
    return at.astimezone(timezone.utc).replace(tzinfo=None).isoformat(" ", "microseconds")


_SECOND: tuple[int, str] = (0, "1970-01-01 00:00:00.")  # the last whole second formatted, and its text


def sqlite_epoch(at: float) -> str:
    """Epoch seconds as sqlite_time writes them (to the microsecond, rounded). The tracker stamps
    each hit with time.time(); a second's text is formatted once for all its hits, the
    microseconds zero-padded by slicing (cheaper than a format spec)."""
    global _SECOND
    micros = round(at * 1_000_000)
    second = micros // 1_000_000
    cached = _SECOND
    if cached[0] != second:
        cached = _SECOND = (second, datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%d %H:%M:%S."))
    return cached[1] + str(micros - second * 1_000_000 + 1_000_000)[1:]


def parse_time(text: str | None) -> datetime | None:
    """A stored UTCDateTime back as an aware datetime, as SQLAlchemy reads it on SQLite."""
    return None if text is None else datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


Db = sqlite3.Connection
