"""Signed webhooks: each event POSTed as JSON to every ``[[webhooks]]`` URL, at least once.

The durable outbox is the event log itself: each webhook has a cursor in ``webhook_cursors``,
moved on after the receiver answered 2xx, so a restart re-sends at most what was in flight. A
receiver that fails (5xx, 408, 429, timeout, refused) gets the same event again with exponential
backoff from ``retry_initial_seconds``; after 24 hours of failing, that event is given up (counted).
A 4xx answer is final for that event. Several workers share the table under a lease. A slow or
dead receiver never slows the relay or the tracker: this runs on its own.

Signed by Standard Webhooks (https://www.standardwebhooks.com/): ``webhook-id`` (the event's
``id``, the same on every retry: receivers deduplicate on it), ``webhook-timestamp`` (unix seconds
of this attempt) and ``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``. The
HMAC key is the UTF-8 bytes of the configured ``secret``; Standard Webhooks libraries take it as
``whsec_`` + base64 of those bytes (``Webhook("whsec_" + b64encode(secret.encode()).decode())``)
or as the raw bytes (``Webhook(secret.encode())``).

Deprecated, kept for one release: ``X-Trackrelay-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of
"t.body">`` (same key, same timestamp).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import socket
import time
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING

import aiohttp

from storage import events as ev
from storage import webhooks as store
from storage.models import utcnow
from core.aio import finish
from core.bus import EventBus
from core.config import Config, Webhook

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import async_sessionmaker

log = logging.getLogger("trackrelay.webhooks")

GIVE_UP_AFTER = timedelta(hours=24)
MAX_BACKOFF = 3600.0
LEASE_SECONDS = 60.0
BATCH = 50


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The deprecated ``X-Trackrelay-Signature`` value (kept for one release)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def standard_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks ``webhook-signature`` value: ``v1,`` + base64 HMAC-SHA256 of
    ``{msg_id}.{timestamp}.{body}``, keyed with the secret's UTF-8 bytes."""
    mac = hmac.new(secret.encode(), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one delivery attempt: Standard Webhooks' and the deprecated one."""
    return {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": standard_signature(secret, msg_id, timestamp, body),
        "X-Trackrelay-Signature": signature(secret, timestamp, body),
    }


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

    async def deliver_some(self, hook: Webhook, http: aiohttp.ClientSession) -> float:
        """Deliver what is due; returns how long to wait before the next look."""
        state = await store.claim(self.sessionmaker, hook.url, self.owner, LEASE_SECONDS)
        if state is None:
            return LEASE_SECONDS / 2  # another worker has it
        now = utcnow()
        if state.next_attempt_at and state.next_attempt_at > now:
            return min((state.next_attempt_at - now).total_seconds(), 1.0)
        cursor = state.cursor
        rows = await store.events_after(self.sessionmaker, cursor, BATCH)
        wanted = set(hook.events)
        delivered = given_up = 0
        failing = None
        for e in rows:
            if wanted and e.type not in wanted:
                cursor = ev.cursor_of(e)
                continue
            payload = dict(e.to_json(), user=e.user)
            outcome = await self._post(hook, http, str(e.id), json.dumps(payload, ensure_ascii=False).encode())
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

    async def _post(self, hook: Webhook, http: aiohttp.ClientSession, msg_id: str, body: bytes) -> str:
        t = int(time.time())
        try:
            async with http.post(hook.url, data=body, headers=signed_headers(hook.secret, msg_id, t, body)) as r:
                await r.read()
                if 200 <= r.status < 300:
                    return "ok"
                if r.status in (408, 425, 429) or r.status >= 500:
                    return f"HTTP {r.status}"
                return "final"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            return type(e).__name__

    async def _save(self, hook: Webhook, state: store.Claimed, cursor: ev.Cursor, delivered: int,
                    given_up: int, failing: str | None) -> None:
        if not failing:
            await store.release(self.sessionmaker, state, cursor, delivered, given_up)
            return
        now = utcnow()
        attempts = state.attempts + 1
        delay = min(hook.retry_initial_seconds * 2 ** (attempts - 1), MAX_BACKOFF)
        await store.release(self.sessionmaker, state, cursor, delivered, given_up, failing=True, attempts=attempts,
                            failing_since=state.failing_since or now, next_attempt_at=now + timedelta(seconds=delay))
        if attempts in (1, 5) or attempts % 20 == 0:
            log.warning("webhook %s failing (%s): attempt %d, retry in %.0f s", hook.url[:60], failing,
                        attempts, delay)
