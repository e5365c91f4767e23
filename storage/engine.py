"""Engine setup: SQLite in WAL mode with full sync (durable before the 250), or PostgreSQL."""

from __future__ import annotations

from sqlalchemy import event
from sqlalchemy.ext.asyncio import (AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker,
                                    create_async_engine)


def make_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        # One connection: SQLite has one writer at a time, and writers on several connections
        # wait for each other in sleep-and-retry busy loops (up to 100 ms a nap). Queueing for the
        # single connection in asyncio instead keeps the commit latency to the fsync itself.
        # No rollback when the connection goes back to the pool: SQLAlchemy's connections and
        # sessions end their own transactions (commit, or rollback on close), and the functions
        # of storage.direct commit or roll back theirs; the pool's extra rollback was one more trip
        # to the driver's thread per use.
        engine = create_async_engine(url, connect_args={"timeout": 30}, pool_size=1, max_overflow=0,
                                     pool_timeout=60, pool_reset_on_return=None)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsync'd at every commit, so a committed spool survives power loss.
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


def make_read_engine(url: str, write_engine: AsyncEngine) -> AsyncEngine:
    """For SQLite, a second engine of several read-only connections: WAL readers never wait for
    the writer, and reads on the hot path (the relay's CRM look-up) need not queue for the single
    write connection. PostgreSQL serves both from one pool."""
    if not url.startswith("sqlite"):
        return write_engine
    # No rollback when a connection goes back to the pool: the connections are query-only and
    # the driver opens no transaction for a SELECT, so there is nothing to roll back (it cost a
    # round trip to the driver's thread per look-up).
    engine = create_async_engine(url, connect_args={"timeout": 30}, pool_size=4, max_overflow=4,
                                 pool_reset_on_return=None)

    @event.listens_for(engine.sync_engine, "connect")
    def _read_only(dbapi_conn, _record):  # pragma: no cover - trivial
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA query_only=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    return engine


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)



def engine_of(sessionmaker: async_sessionmaker) -> AsyncEngine:
    """The engine a sessionmaker is bound to: hot paths that need no ORM session (the spool's
    group commit, delivery outcomes, the relay's look-ups) work on a bare connection from it."""
    return sessionmaker.kw["bind"]


async def connection_of(db: AsyncSession | AsyncConnection) -> AsyncConnection:
    """The connection behind a session, or the connection itself."""
    return db if isinstance(db, AsyncConnection) else await db.connection()
