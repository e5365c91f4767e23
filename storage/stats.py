"""The figures a metrics scrape and a readiness check ask of the database, by what they are.

Each takes a connection (``engine.connect()``): a scrape runs them together with a short timeout
and caches the result (``trackrelay.metrics``), never per message.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

#: A webhook backlog is counted up to this many events (beyond it, the figure says "at least").
BACKLOG_COUNT_LIMIT = 1000000


async def copies_by_status(conn: AsyncConnection) -> dict[str, int]:
    """Copies (recipients) by status — queued, sending, deferred, sent, bounced, held, … — all processes."""
    rows = await conn.execute(text("SELECT status, count(*) FROM recipients GROUP BY status"))
    return {s: n for s, n in rows}


async def crm_jobs_by_state(conn: AsyncConnection) -> dict[str, int]:
    """CRM-logging jobs by state, all processes."""
    rows = await conn.execute(text("SELECT state, count(*) FROM crm_jobs GROUP BY state"))
    return {s: n for s, n in rows}


async def webhook_backlogs(conn: AsyncConnection) -> dict[str, tuple[int, int, int]]:
    """Per webhook URL: (events after its cursor, events given up, events delivered)."""
    hooks = {}
    for url, cursor, given_up, delivered in await conn.execute(
            text("SELECT url, cursor, given_up, delivered FROM webhook_cursors")):
        after = int(str(cursor).rpartition(".")[2] or 0) if str(cursor).replace(".", "").isdigit() else 0
        backlog = (await conn.execute(text(
            f"SELECT count(*) FROM (SELECT 1 FROM events WHERE id > :id LIMIT {BACKLOG_COUNT_LIMIT}) AS b"),
            {"id": after})).scalar_one()
        hooks[url] = (backlog, given_up or 0, delivered or 0)
    return hooks


async def ping(engine: AsyncEngine) -> None:
    """A round trip to the database (readiness); raises when it does not answer."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
