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

from sqlalchemy import exc as sa
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from storage import direct, events
from storage.engine import connection_of, engine_of
from storage.models import CrmJob, Message, Recipient, utcnow
from core.aio import cancel

log = logging.getLogger("trackrelay.spool")

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Group commit: ``submit`` waits until its item is part of a flushed batch."""

    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]], max_batch: int = 256,
                 name: str = "batcher", linger: float = 0.0):
        self._flush = flush
        self._max = max_batch
        #: Seconds to wait for more items after the first (0: write at once). For writes nobody
        #: waits on, fewer and larger commits.
        self._linger = linger
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._name = name
        self._busy = False
        self.batches = 0
        self.items = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self, grace: float = 5.0) -> None:
        # Let a batch being written finish: cancelled mid-commit, the driver's thread would go on
        # after the event loop is gone. Waiting for the next item is safe to cancel.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while (self._busy or not self._queue.empty()) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await cancel(self._task)
        self._task = None
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("shutting down"))

    async def submit(self, item: T) -> R:
        return await self.submit_nowait(item)

    def submit_nowait(self, item: T) -> asyncio.Future[R]:
        """Queue the item now; the future is done once its batch is committed."""
        if self._task is None:
            raise RuntimeError(f"{self._name} is not running")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, fut))
        return fut

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            self._busy = True  # from here on stop() waits for this batch (lingering included)
            try:
                if self._linger and self._queue.qsize() < self._max:
                    await asyncio.sleep(self._linger)
                while len(batch) < self._max and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                items = [item for item, _ in batch]
                results = await self._flush(items)
            except asyncio.CancelledError:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(RuntimeError("shutting down"))
                raise
            except Exception as exc:
                if len(batch) > 1 and not transient(exc):
                    # One item's fault (a value the database refuses) must not fail the others:
                    # each is written alone, and only the one at fault learns it.
                    log.error("%s: commit of %d items failed (%s: %s); writing them one by one", self._name,
                              len(batch), type(exc).__name__, exc)
                    await self._one_by_one(batch)
                else:  # the database itself failed: every waiter learns it
                    log.error("%s: commit of %d items failed: %s: %s", self._name, len(batch),
                              type(exc).__name__, exc)
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                continue
            finally:
                self._busy = False
            self.batches += 1
            self.items += len(items)
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)


    async def _one_by_one(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        for item, fut in batch:
            try:
                (result,) = await self._flush([item])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not fut.done():
                    fut.set_exception(exc)
                continue
            self.batches += 1
            self.items += 1
            if not fut.done():
                fut.set_result(result)


def message_fault(exc: BaseException) -> bool:
    """Is the failure this message's own (a value the database or its driver refuses), so that
    writing it again fails the same way, rather than the database's (down, locked, missing a
    table, out of disk), which may pass later? The driver's own error is looked for through the
    wrappers (SQLAlchemy's ``orig``, the cause chain): asyncpg's client-side ``DataError`` for a
    value it cannot encode is a ``ValueError``."""
    values = (UnicodeError, ValueError, TypeError, OverflowError, sa.DataError, sa.IntegrityError)
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, values):
            return True
        cur = getattr(cur, "orig", None) or cur.__cause__
        seen += 1
    return False


def transient(exc: BaseException) -> bool:
    """May the same message succeed later? Everything that is not the message's own fault."""
    return not message_fault(exc)


@dataclass
class SpoolRecipient:
    address: str
    token: str | None
    track_opens: bool
    track_clicks: bool
    log: bool
    reasons: list[str]
    never_log: bool = False


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
    #: Hand the copies straight to this process's worker: inserted already claimed by it.
    claim_owner: str | None = None
    lease_until: datetime | None = None


_INSERT_MESSAGES = insert(Message.__table__).returning(Message.__table__.c.id, sort_by_parameter_order=True)
_INSERT_RECIPIENTS = insert(Recipient.__table__).returning(Recipient.__table__.c.id, sort_by_parameter_order=True)
_INSERT_JOBS = insert(CrmJob.__table__)


async def add_entries(session: AsyncSession | AsyncConnection, entries: list[SpoolEntry]) -> list[tuple[int, list[int]]]:
    """Insert the rows of these entries (Core statements built once: a handful per batch, not per
    row; on SQLite one trip to its thread for the whole batch). Returns each message's id with its
    recipient rows' ids, in recipient order."""
    conn = await connection_of(session)
    if direct.usable(conn):
        return await direct.run(conn, _add_entries_sqlite, entries, events.insert_sql(conn.dialect))
    msg_ids = (await conn.execute(_INSERT_MESSAGES, [
        dict(zip(_MESSAGE_COLUMNS, _message_values(e, e.accepted_at))) for e in entries])).scalars().all()
    rcpt_rows = [dict(zip(_RECIPIENT_COLUMNS, _recipient_values(e, mid, r, e.accepted_at, e.lease_until,
                                                                list(r.reasons))))
                 for e, mid in zip(entries, msg_ids) for r in e.recipients]
    rcpt_ids: list[int] = []
    if rcpt_rows:
        rcpt_ids = (await conn.execute(_INSERT_RECIPIENTS, rcpt_rows)).scalars().all()
        users = {mid: e.user for e, mid in zip(entries, msg_ids)}
        now = utcnow()
        await events.insert_idempotent(conn, [
            dict(type="queued", at=now, message_pk=row["message_pk"], recipient_pk=rid,
                 user=users[row["message_pk"]]) for row, rid in zip(rcpt_rows, rcpt_ids)])
    jobs = [dict(message_pk=mid, state="pending", created_at=e.accepted_at, attempts=0)
            for e, mid in zip(entries, msg_ids) if e.log and e.kind == "mail"]
    if jobs:
        await conn.execute(_INSERT_JOBS, jobs)
    copies: dict[int, list[int]] = {}
    for row, rid in zip(rcpt_rows, rcpt_ids):
        copies.setdefault(row["message_pk"], []).append(rid)
    return [(mid, copies.get(mid, [])) for mid in msg_ids]


_MESSAGE_COLUMNS = ("kind", "message_id", "user", "mail_from", "from_header", "subject", "client_ip",
                    "accepted_at", "size", "raw", "log", "log_associate")
_RECIPIENT_COLUMNS = ("message_pk", "address", "token", "track_opens", "track_clicks", "log", "reasons",
                      "status", "lease_owner", "lease_until", "never_log", "attempts", "next_attempt_at",
                      "reclaims", "dsn")
_MESSAGE_SQL = direct.insert_sql("messages", _MESSAGE_COLUMNS)


def _message_values(e: SpoolEntry, accepted_at) -> tuple:
    """A message row in _MESSAGE_COLUMNS order (``accepted_at`` as the path binds times)."""
    return (e.kind, e.message_id, e.user, e.mail_from, e.from_header, e.subject, e.client_ip, accepted_at,
            len(e.raw), e.raw, e.log, e.log_associate)


def _recipient_values(e: SpoolEntry, mid: int, r: SpoolRecipient, accepted_at, lease_until, reasons) -> tuple:
    """A recipient row in _RECIPIENT_COLUMNS order (times and reasons as the path binds them)."""
    return (mid, r.address, r.token, r.track_opens, r.track_clicks, r.log, reasons,
            "sending" if e.claim_owner else "queued", e.claim_owner, lease_until, r.never_log, 0,
            accepted_at, 0, "none")
_RECIPIENT_SQL = direct.insert_sql("recipients", _RECIPIENT_COLUMNS)
_JOB_SQL = direct.insert_sql("crm_jobs", ("message_pk", "state", "created_at", "attempts"))


def _add_entries_sqlite(db: direct.Db, entries: list[SpoolEntry], events_sql: str) -> list[tuple[int, list[int]]]:
    """``add_entries`` on SQLite's thread: the same rows, ids from ``lastrowid``."""
    cur = db.cursor()
    now = events.sqlite_time(utcnow())
    out: list[tuple[int, list[int]]] = []
    queued: list[tuple] = []
    jobs: list[tuple] = []
    for e in entries:
        at = events.sqlite_time(e.accepted_at)
        cur.execute(_MESSAGE_SQL, _message_values(e, at))
        mid = cur.lastrowid
        lease = events.sqlite_time(e.lease_until) if e.lease_until is not None else None
        rids = []
        for r in e.recipients:
            cur.execute(_RECIPIENT_SQL, _recipient_values(e, mid, r, at, lease, direct.json_text(list(r.reasons))))
            rid = cur.lastrowid
            rids.append(rid)
            queued.append(("queued", now, mid, rid, e.user, None, None, None, None, None, None,
                           False, False, None))
        if e.log and e.kind == "mail":
            jobs.append((mid, "pending", at, 0))
        out.append((mid, rids))
    if queued:
        cur.executemany(events_sql, queued)
    if jobs:
        cur.executemany(_JOB_SQL, jobs)
    cur.close()
    return out


def spool_writer(sessionmaker: async_sessionmaker) -> Batcher[SpoolEntry, tuple[int, list[int]]]:
    engine = engine_of(sessionmaker)

    async def flush(entries: list[SpoolEntry]) -> list[tuple[int, list[int]]]:
        if direct.usable(engine):  # rows and commit in one trip to SQLite's thread
            return await direct.transaction(engine, _add_entries_sqlite, entries, events.insert_sql(engine.dialect))
        async with engine.begin() as conn:  # Core rows only: no ORM session to set up and close
            return await add_entries(conn, entries)

    return Batcher(flush, name="spool-writer")
