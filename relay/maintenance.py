"""The worker's maintenance: a DSN for every message with bounced copies, and the purge of spooled
bytes of delivered messages (``queue.keep_delivered_days``).

One loop, woken when a bounce that wants a DSN is committed (``wake``) and otherwise every
``MAINTENANCE_SECONDS``; the purge runs once an hour. Each DSN is queued as mail of its own
(kind ``dsn``), so the lanes deliver it: ``on_written`` tells them.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Callable

from sqlalchemy.ext.asyncio import async_sessionmaker

from relay import dsn, maillog
from relay.message import get
from storage import queue as q
from core.aio import finish
from storage.models import utcnow
from storage.spool import SpoolEntry, SpoolRecipient, add_entries
from core.config import Config

log = logging.getLogger("trackrelay.worker")
#: The mail log: one line per DSN, greppable by the queue id of the bounced message.
mail_log = maillog.log

MAINTENANCE_SECONDS = 30.0
#: Seconds between purges of spooled bytes.
PURGE_SECONDS = 3600


class Maintenance:
    def __init__(self, config: Config, sessionmaker: async_sessionmaker,
                 on_written: Callable[[], None] | None = None):
        self.config = config
        self.sessionmaker = sessionmaker
        #: Called when DSNs were queued (something new is due in the database).
        self.on_written = on_written or (lambda: None)
        self._recipients_shown = maillog.recipients_mode(config)
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None

    def reconfigure(self, config: Config) -> None:
        self.config = config

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="delivery-maintenance")

    def wake(self) -> None:
        """A bounce that wants a DSN was committed (or the CLI bounced copies)."""
        self._wake.set()

    def halt(self) -> None:
        """Stop after the step in hand (``stop`` waits for it)."""
        self._stopping = True
        self._wake.set()

    async def stop(self) -> None:
        self.halt()
        await finish(self._task)

    async def _run(self) -> None:
        last_purge = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            # Cleared before the work, not after: a wake-up that comes during it (a bounce to
            # answer, or stop()) is then not lost for MAINTENANCE_SECONDS.
            self._wake.clear()
            try:
                if await self.write_dsns():
                    self.on_written()
                if loop.time() - last_purge > PURGE_SECONDS:
                    await self.purge()
                    last_purge = loop.time()
            except Exception as exc:
                log.error("maintenance failed: %s", maillog.error(exc))
            try:
                await asyncio.wait_for(self._wake.wait(), MAINTENANCE_SECONDS)
            except asyncio.TimeoutError:
                pass

    async def write_dsns(self) -> int:
        """Queue one DSN per message for its bounced copies; returns how many were written."""
        written = 0
        logged: list[tuple[int, int, str, int]] = []
        async with self.sessionmaker() as session:
            async with session.begin():
                pending = await q.pending_dsns(session)
                if not pending:
                    return 0
                messages = await q.load_messages(session, set(pending))
                for pk, copies in pending.items():
                    orig = messages[pk]
                    failed = [dsn.Failed(r.address, r.last_reply or "") for r in copies]
                    raw = dsn.build(hostname=self.config.relay.hostname,
                                    dsn_from=self.config.queue.dsn_from, to=orig.mail_from,
                                    original=orig.raw, message_id=orig.message_id,
                                    arrival=orig.accepted_at, failed=failed)
                    ((dsn_pk, _),) = await add_entries(session, [SpoolEntry(
                        kind="dsn", message_id=get(raw, "message-id") or "", user=orig.user,
                        mail_from=self.config.queue.dsn_from, raw=raw,
                        recipients=[SpoolRecipient(orig.mail_from, None, False, False, False, ["dsn"])],
                        subject="Undelivered Mail Returned to Sender")])
                    await q.mark_dsn(session, [r.id for r in copies], "sent")
                    written += 1
                    logged.append((pk, dsn_pk, orig.mail_from, len(copies)))
        for pk, dsn_pk, to, n in logged:  # once committed
            mail_log.info("queue_id=%d status=dsn dsn_queue_id=%d to=%s copies=%d", pk, dsn_pk,
                          maillog.shown(to, self._recipients_shown), n)
        return written

    async def purge(self) -> int:
        """Drop the spooled bytes of messages delivered more than ``queue.keep_delivered_days`` ago."""
        cutoff = utcnow() - timedelta(days=self.config.queue.keep_delivered_days)
        async with self.sessionmaker() as session:
            async with session.begin():
                return await q.purge_delivered(session, cutoff)
