"""A whole batch in one trip to SQLite's thread, for the few writes that run per message.

aiosqlite runs every call on its own thread, and SQLAlchemy's adapter makes one round trip there
per execute, per fetch and per commit; each trip wakes the event loop through its self-pipe, and
each statement costs SQLAlchemy's per-statement and per-row work. The spool's group commit and the
delivery outcomes run several statements per batch many times a second: on SQLite they run here
as one plain function on the ``sqlite3`` connection, inside that connection's thread, within the
transaction the caller opened with SQLAlchemy (which still commits or rolls it back).

Only SQLite goes this way (``usable``); PostgreSQL keeps the callers' SQLAlchemy Core path. Values
are bound exactly as SQLAlchemy binds them on SQLite (``tests/test_schema.py`` compares the stored
rows of both paths).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Callable, Sequence, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

T = TypeVar("T")


def usable(conn: AsyncConnection) -> bool:
    return conn.dialect.name == "sqlite" and conn.dialect.driver == "aiosqlite"


async def run(conn: AsyncConnection, fn: Callable[..., T], *args: Any) -> T:
    """``fn(sqlite3_connection, *args)`` on the connection's own thread, in one trip.

    Uses aiosqlite's ``_execute`` (how its own ``execute_fetchall`` runs): the function queued on
    the thread that owns the ``sqlite3`` connection."""
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    return await driver._execute(fn, driver._conn, *args)


def insert_sql(table: str, columns: Sequence[str]) -> str:
    cols = ", ".join(f'"{c}"' for c in columns)
    return f'INSERT INTO "{table}" ({cols}) VALUES ({", ".join("?" for _ in columns)})'


def json_text(value: Any) -> str:
    """A JSON column's value as SQLAlchemy stores it on SQLite (``json.dumps``, default options)."""
    return json.dumps(value)


def in_list(n: int) -> str:
    return ", ".join("?" for _ in range(n))


Db = sqlite3.Connection
