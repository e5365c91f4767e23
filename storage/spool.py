"""The durable spool: what is committed before the SMTP 250, written in group commits.

Concurrent SMTP sessions hand their accepted messages to one ``Batcher``; it writes everything
that is waiting in one transaction (one fsync), then answers each session. While one commit is
on disk, the next batch gathers, so throughput grows with concurrency instead of fsyncs.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Awaitable, Callable, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.models import CrmJob, Event, Message, Recipient, utcnow

log = logging.getLogger("trackrelay.spool")

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Group commit: ``submit`` waits until its item is part of a flushed batch."""

    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]], max_batch: int = 256,
                 name: str = "batcher"):
        self._flush = flush
        self._max = max_batch
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._name = name
        self.batches = 0
        self.items = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("shutting down"))

    async def submit(self, item: T) -> R:
        if self._task is None:
            raise RuntimeError(f"{self._name} is not running")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            items = [item for item, _ in batch]
            try:
                results = await self._flush(items)
            except asyncio.CancelledError:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(RuntimeError("shutting down"))
                raise
            except Exception as exc:  # every waiter learns the batch failed
                log.error("%s: commit of %d items failed: %s", self._name, len(items), type(exc).__name__)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(items)
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)


@dataclass
class SpoolRecipient:
    address: str
    token: str | None
    track_opens: bool
    track_clicks: bool
    log: bool
    reasons: list[str]


@dataclass
class SpoolEntry:
    """An accepted message and its per-recipient plan, as committed before the 250."""

    message_id: str
    user: str | None
    mail_from: str
    raw: bytes
    recipients: list[SpoolRecipient]
    from_header: str = ""
    subject: str = ""
    client_ip: str | None = None
    log: bool = False
    log_associate: str | None = None
    kind: str = "mail"
    accepted_at: datetime = field(default_factory=utcnow)


def add_entry(session: AsyncSession, entry: SpoolEntry) -> Message:
    """Add the rows of one entry to a session (the caller flushes and commits)."""
    msg = Message(
        kind=entry.kind, message_id=entry.message_id, user=entry.user, mail_from=entry.mail_from,
        from_header=entry.from_header, subject=entry.subject, client_ip=entry.client_ip,
        accepted_at=entry.accepted_at, size=len(entry.raw), raw=entry.raw, log=entry.log,
        log_associate=entry.log_associate,
    )
    msg.recipients = [
        Recipient(address=r.address, token=r.token, track_opens=r.track_opens,
                  track_clicks=r.track_clicks, log=r.log, reasons=list(r.reasons), status="queued",
                  attempts=0, next_attempt_at=entry.accepted_at, reclaims=0, dsn="none")
        for r in entry.recipients
    ]
    session.add(msg)
    return msg


async def add_entries(session: AsyncSession, entries: list[SpoolEntry]) -> list[int]:
    msgs = [add_entry(session, e) for e in entries]
    await session.flush()
    for entry, msg in zip(entries, msgs):
        for r in msg.recipients:
            session.add(Event(type="queued", at=entry.accepted_at, message_pk=msg.id,
                              recipient_pk=r.id, user=entry.user, first=False, inferred=False))
        if entry.log and entry.kind == "mail":
            session.add(CrmJob(message_pk=msg.id, state="pending", created_at=entry.accepted_at, attempts=0))
    return [m.id for m in msgs]


def spool_writer(sessionmaker: async_sessionmaker) -> Batcher[SpoolEntry, int]:
    async def flush(entries: list[SpoolEntry]) -> list[int]:
        async with sessionmaker() as session:
            async with session.begin():
                return await add_entries(session, entries)

    return Batcher(flush, name="spool-writer")
