"""Shared fixtures: the database (SQLite and real PostgreSQL), the upstream sink, a running relay."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from helpers import Sink, base_config, free_port, make_config, wait_until

PG_URL = os.environ.get("TRACKRELAY_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
#: The database the tests create and reset (another name lets two checkouts test side by side).
PG_TEST_DB = os.environ.get("TRACKRELAY_TEST_PG_DB", "trackrelay_test")
_pg_state: dict[str, object] = {}


def _pg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def _pg_available() -> str | None:
    """None when usable, else why not."""
    if "ok" in _pg_state:
        return _pg_state["ok"]  # type: ignore[return-value]
    import asyncpg
    try:
        conn = await asyncio.wait_for(asyncpg.connect(_pg_dsn(PG_URL)), 5)
    except Exception as e:
        _pg_state["ok"] = f"PostgreSQL not reachable at {PG_URL} ({type(e).__name__}); set TRACKRELAY_TEST_PG_URL"
        return _pg_state["ok"]  # type: ignore[return-value]
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", PG_TEST_DB)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{PG_TEST_DB}"')
    finally:
        await conn.close()
    _pg_state["ok"] = None
    return None


def pg_test_url() -> str:
    base, _, _ = PG_URL.rpartition("/")
    return f"{base}/{PG_TEST_DB}"


async def reset_pg() -> None:
    import asyncpg
    conn = await asyncpg.connect(_pg_dsn(pg_test_url()))
    try:
        await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public;")
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def db_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/trackrelay.db"
    why = await _pg_available()
    if why:
        pytest.skip(why)
    await reset_pg()
    return pg_test_url()


@pytest.fixture
async def pg_url() -> str:
    """The PostgreSQL test database, reset, for tests that need PostgreSQL itself (several processes)."""
    why = await _pg_available()
    if why:
        pytest.skip(why)
    await reset_pg()
    return pg_test_url()


@pytest.fixture
async def sink():
    s = await Sink().start()
    yield s
    await s.stop()


class RelayFixture:
    """A trackrelay Service running in this event loop, plus handy views on its database."""

    def __init__(self, tmp_path: Path, db_url: str, sink: Sink):
        self.tmp_path, self.db_url, self.sink = tmp_path, db_url, sink
        self.port = free_port()
        self.service = None
        self.config = None

    def config_dict(self, **sections) -> dict:
        return base_config(db_url=self.db_url, relay_port=self.port, upstream_url=self.sink.url,
                           tmp=self.tmp_path, **sections)

    async def start(self, **sections):
        from trackrelay.service import Service
        for attempt in range(3):
            self.config = make_config(self.config_dict(**sections))
            self.service = Service(self.config)
            try:
                await self.service.start()
                return self
            except OSError as e:  # a free port taken by another process meanwhile: new ports
                await self.service.stop()
                self.service = None
                if e.errno != errno.EADDRINUSE or attempt == 2:
                    raise
                self.port = free_port()

    async def stop(self):
        if self.service:
            await self.service.stop()
            self.service = None

    async def rows(self, sql: str, **params):
        from sqlalchemy import text
        async with self.service.sessionmaker() as s:
            return (await s.execute(text(sql), params)).all()

    async def events_written(self, timeout: float = 15.0):
        """Wait until every tracker hit so far is written (it has left the recorder's buffer; with
        the writer process, the child has reported it)."""
        recorder = self.service.tracker.recorder
        await wait_until(lambda: not recorder.depth, timeout, what="every tracker hit written")

    async def wait_status(self, statuses: set[str], count: int, timeout: float = 15.0):
        """Wait until `count` copies are in one of `statuses`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            rows = await self.rows("SELECT address, status FROM recipients")
            if sum(1 for _, st in rows if st in statuses) >= count:
                return rows
            if loop.time() > deadline:
                raise AssertionError(f"copies {rows}, wanted {count} in {statuses}")
            await asyncio.sleep(0.05)


@pytest.fixture
async def relay(tmp_path, db_url, sink):
    r = RelayFixture(tmp_path, db_url, sink)
    yield r
    await r.stop()
