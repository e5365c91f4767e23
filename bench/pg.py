"""The benchmarks' PostgreSQL: a database of their own, emptied per run, and the server's CPU."""

from __future__ import annotations

import os
from pathlib import Path

from proc_cpu import cpu_seconds  # bench/ is on sys.path as the scripts' directory

PG = os.environ.get("TRACKRELAY_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
DB = "trackrelay_bench"


def dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def fresh_db() -> str:
    """DB dropped and created again (on the server of TRACKRELAY_TEST_PG_URL); its URL."""
    import asyncpg
    conn = await asyncpg.connect(dsn(PG))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{DB}"')
    finally:
        await conn.close()
    return PG.rpartition("/")[0] + "/" + DB


async def scalar(url: str, sql: str) -> int:
    import asyncpg
    conn = await asyncpg.connect(dsn(url))
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def postgres_cpu() -> float:
    """CPU of all the PostgreSQL server's processes so far (every database on it)."""
    total = 0.0
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "comm").read_text().strip() in ("postgres", "postmaster"):
                    total += cpu_seconds(int(p.name))
            except OSError:  # gone meanwhile
                pass
    return total
