"""Webhook cursors: each ``[[webhooks]]`` URL's place in the event log, its lease and its counters.

``relay/webhooks.py`` decides what to send, when to retry and how to sign; this module is where
its cursor row is read and written. Each function opens its own short transaction: nothing is
held while a receiver is being called.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker

from core.events import Event
from storage import events as ev
from storage.models import WebhookCursor, utcnow


@dataclass(frozen=True)
class Claimed:
    """A webhook's cursor row as claimed (its lease is held until ``release``)."""

    url: str
    cursor: ev.Cursor
    attempts: int
    delivered: int
    given_up: int
    failing_since: datetime | None
    next_attempt_at: datetime | None


async def claim(sessionmaker: async_sessionmaker, url: str, owner: str, lease_seconds: float) -> Claimed | None:
    """Take the lease on ``url``'s cursor for ``lease_seconds`` (a lease that is free, expired or
    already ``owner``'s). A new webhook's cursor is created at the end of the event log: it starts
    with the events from now on, not the whole history. None: another worker has it."""
    now = utcnow()
    async with sessionmaker() as s:
        async with s.begin():
            if await s.get(WebhookCursor, url) is None:
                s.add(WebhookCursor(url=url, cursor=str(await ev.latest_cursor(s, None)), attempts=0,
                                    delivered=0, given_up=0))
                try:
                    await s.flush()
                except IntegrityError:  # another worker created it first
                    return None
            res = await s.execute(
                update(WebhookCursor).where(WebhookCursor.url == url,
                                            or_(WebhookCursor.lease_until.is_(None),
                                                WebhookCursor.lease_until < now,
                                                WebhookCursor.lease_owner == owner))
                .values(lease_owner=owner, lease_until=now + timedelta(seconds=lease_seconds))
                .execution_options(synchronize_session=False))
            if not res.rowcount:
                return None
            row = (await s.execute(select(WebhookCursor.cursor, WebhookCursor.attempts, WebhookCursor.delivered,
                                          WebhookCursor.given_up, WebhookCursor.failing_since,
                                          WebhookCursor.next_attempt_at)
                                   .where(WebhookCursor.url == url))).one()
    cursor, attempts, delivered, given_up, failing_since, next_attempt_at = row
    return Claimed(url, ev.parse_cursor(cursor) or ev.Cursor(), attempts, delivered, given_up, failing_since,
                   next_attempt_at)


async def release(sessionmaker: async_sessionmaker, claimed: Claimed, cursor: ev.Cursor, delivered: int,
                  given_up: int, failing: bool = False, next_attempt_at: datetime | None = None,
                  attempts: int | None = None, failing_since: datetime | None = None) -> None:
    """Move the cursor to ``cursor``, add to the counters and free the lease. ``failing``: the
    receiver is failing (``attempts``, ``failing_since`` and ``next_attempt_at`` as given); else
    the failure state is cleared."""
    values: dict = {"cursor": str(cursor), "delivered": claimed.delivered + delivered,
                    "given_up": claimed.given_up + given_up, "lease_until": None, "lease_owner": None}
    if failing:
        values.update(attempts=attempts, failing_since=failing_since, next_attempt_at=next_attempt_at)
    else:
        values.update(attempts=0, failing_since=None, next_attempt_at=None)
    async with sessionmaker() as s:
        async with s.begin():
            await s.execute(update(WebhookCursor).where(WebhookCursor.url == claimed.url).values(**values)
                            .execution_options(synchronize_session=False))


async def events_after(sessionmaker: async_sessionmaker, cursor: ev.Cursor, limit: int) -> list[Event]:
    """Everybody's events after ``cursor`` in commit order (``storage.events.events_after``), as
    ``core.events.Event`` records with their Message-ID and recipient."""
    async with sessionmaker() as s:
        return await ev.events_after(s, None, cursor, limit)
