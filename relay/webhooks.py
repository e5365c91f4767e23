"""Signed webhooks: each event POSTed as JSON to every ``[[webhooks]]`` URL, at least once.

The durable outbox is the event log itself: each webhook has a cursor in ``webhook_cursors``,
moved on after the receiver answered 2xx, so a restart re-sends at most what was in flight. A
receiver that fails (5xx, 408, 429, timeout, refused) gets the same event again with exponential
backoff from ``retry_initial_seconds``; after 24 hours of failing, that event is given up (counted).
A 4xx answer is final for that event. Several workers share the table under a lease. A slow or
dead receiver never slows the relay or the tracker: this runs on its own.

Header ``X-Trackrelay-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "t.body">``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import socket
import time
import uuid
from datetime import timedelta

import aiohttp
from sqlalchemy import or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker

from storage import events as ev
from storage.models import WebhookCursor, utcnow
from core.aio import finish
from core.bus import EventBus
from core.config import Config, Webhook

log = logging.getLogger("trackrelay.webhooks")

GIVE_UP_AFTER = timedelta(hours=24)
MAX_BACKOFF = 3600.0
LEASE_SECONDS = 60.0
BATCH = 50


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class WebhookSender:
    def __init__(self, config: Config, sessionmaker: async_sessionmaker, bus: EventBus | None = None):
        self.config = config
        self.sessionmaker = sessionmaker
        self.bus = bus or EventBus()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self.sent = 0

    def start(self) -> None:
        for hook in self.config.webhooks:
            self._tasks.append(asyncio.create_task(self._run(hook), name=f"webhook {hook.url[:40]}"))

    async def stop(self) -> None:
        self._stopping = True
        self.bus.notify()
        for t in self._tasks:
            await finish(t, 5.0)
        self._tasks.clear()

    async def _run(self, hook: Webhook) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": "trackrelay-webhooks"}) as http:
            while not self._stopping:
                try:
                    pause = await self.deliver_some(hook, http)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.error("webhook loop error: %s", type(exc).__name__)
                    pause = 5.0
                if pause and not self._stopping:
                    await self.bus.wait(pause)

    async def _claim(self, hook: Webhook) -> WebhookCursor | None:
        now = utcnow()
        async with self.sessionmaker() as s:
            async with s.begin():
                if await s.get(WebhookCursor, hook.url) is None:
                    # A new webhook starts with the events from now on, not the whole history.
                    s.add(WebhookCursor(url=hook.url, cursor=str(await ev.latest_cursor(s, None)), attempts=0,
                                        delivered=0, given_up=0))
                    try:
                        await s.flush()
                    except IntegrityError:  # another worker created it first
                        return None
                res = await s.execute(
                    update(WebhookCursor).where(WebhookCursor.url == hook.url,
                                                or_(WebhookCursor.lease_until.is_(None),
                                                    WebhookCursor.lease_until < now,
                                                    WebhookCursor.lease_owner == self.owner))
                    .values(lease_owner=self.owner, lease_until=now + timedelta(seconds=LEASE_SECONDS))
                    .execution_options(synchronize_session=False))
                if not res.rowcount:
                    return None
                return await s.get(WebhookCursor, hook.url, populate_existing=True)

    async def deliver_some(self, hook: Webhook, http: aiohttp.ClientSession) -> float:
        """Deliver what is due; returns how long to wait before the next look."""
        state = await self._claim(hook)
        if state is None:
            return LEASE_SECONDS / 2  # another worker has it
        now = utcnow()
        if state.next_attempt_at and state.next_attempt_at > now:
            return min((state.next_attempt_at - now).total_seconds(), 1.0)
        cursor = ev.parse_cursor(state.cursor) or ev.Cursor()
        async with self.sessionmaker() as s:
            rows = await ev.list_after(s, None, cursor, BATCH)
        wanted = set(hook.events)
        delivered = given_up = 0
        failing = None
        for e, mid, rcpt in rows:
            if wanted and e.type not in wanted:
                cursor = ev.cursor_of(e)
                continue
            payload = dict(ev.event_json(e, mid, rcpt), user=e.user)
            outcome = await self._post(hook, http, json.dumps(payload, ensure_ascii=False).encode())
            if outcome == "ok":
                delivered += 1
            elif outcome == "final":
                given_up += 1
            else:
                if state.failing_since and now - state.failing_since > GIVE_UP_AFTER:
                    log.error("webhook %s: giving up an event after 24 hours of failures", hook.url[:60])
                    given_up += 1
                else:
                    failing = outcome
                    break
            cursor = ev.cursor_of(e)
        await self._save(hook, state, cursor, delivered, given_up, failing)
        self.sent += delivered
        if failing:
            return 0.5
        return 0.0 if len(rows) == BATCH else 1.0

    async def _post(self, hook: Webhook, http: aiohttp.ClientSession, body: bytes) -> str:
        t = int(time.time())
        try:
            async with http.post(hook.url, data=body, headers={
                    "Content-Type": "application/json", "X-Trackrelay-Signature": signature(hook.secret, t, body)}) as r:
                await r.read()
                if 200 <= r.status < 300:
                    return "ok"
                if r.status in (408, 425, 429) or r.status >= 500:
                    return f"HTTP {r.status}"
                return "final"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            return type(e).__name__

    async def _save(self, hook: Webhook, state: WebhookCursor, cursor: ev.Cursor, delivered: int,
                    given_up: int, failing: str | None) -> None:
        now = utcnow()
        values: dict = {"cursor": str(cursor), "delivered": state.delivered + delivered,
                        "given_up": state.given_up + given_up, "lease_until": None, "lease_owner": None}
        if failing:
            attempts = state.attempts + 1
            delay = min(hook.retry_initial_seconds * 2 ** (attempts - 1), MAX_BACKOFF)
            values.update(attempts=attempts, failing_since=state.failing_since or now,
                          next_attempt_at=now + timedelta(seconds=delay))
            if attempts in (1, 5) or attempts % 20 == 0:
                log.warning("webhook %s failing (%s): attempt %d, retry in %.0f s", hook.url[:60], failing,
                            attempts, delay)
        else:
            values.update(attempts=0, failing_since=None, next_attempt_at=None)
        async with self.sessionmaker() as s:
            async with s.begin():
                await s.execute(update(WebhookCursor).where(WebhookCursor.url == hook.url).values(**values)
                                .execution_options(synchronize_session=False))

