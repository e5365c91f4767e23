"""The delivery worker: claim → render → deliver → record, one copy per recipient.

Lanes (one per upstream connection) claim small batches under a lease and deliver them one by
one over their pooled connection; outcomes go to a group-commit writer so a commit serves every
lane. A separate loop writes DSNs for bounced copies and purges old spooled bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import uuid
from datetime import datetime, timedelta
from typing import Callable, Protocol

from sqlalchemy.ext.asyncio import async_sessionmaker

from relay import dsn
from relay.upstream import Result
from storage import queue as q
from trackrelay.aio import cancel, finish
from storage.engine import engine_of
from storage.events import erase_raw_before
from storage.models import utcnow
from storage.spool import Batcher, SpoolEntry, SpoolRecipient, add_entries
from trackrelay.config import Config

log = logging.getLogger("trackrelay.worker")

CLAIM_BATCH = 32
HANDOFF_MAX = 2000  # copies waiting in memory; beyond that new mail is claimed from the database
IDLE_POLL_SECONDS = 1.0
MAINTENANCE_SECONDS = 30.0
#: Outcomes are committed together after up to this long: lanes do not wait for the commit (the
#: copy stays claimed under its lease until it is written), so a short wait buys larger batches.
OUTCOME_LINGER_SECONDS = 0.02


class Upstream(Protocol):
    async def send(self, mail_from: str, rcpt: str, data: bytes): ...
    async def close(self) -> None: ...


#: (spooled bytes, message, claimed copy) -> (bytes to deliver, note on instrumentation or None)
Renderer = Callable[[bytes, q.Spooled, q.Claimed], tuple[bytes, str | None]]


def plain_renderer(raw: bytes, message: q.Spooled, copy: q.Claimed) -> tuple[bytes, str | None]:
    return raw, None


def backoff(config: Config, attempts_before: int) -> float:
    delay = config.queue.retry_initial_seconds * (2 ** min(attempts_before, 30))
    return min(delay, config.queue.retry_max_seconds)


class DeliveryWorker:
    def __init__(self, config: Config, sessionmaker: async_sessionmaker, upstream: Upstream,
                 render: Renderer = plain_renderer, owner: str | None = None,
                 on_recorded: Callable[[], None] | None = None):
        self.config = config
        self.sessionmaker = sessionmaker
        self._engine = engine_of(sessionmaker)
        self.upstream = upstream
        self.render = render
        self.on_recorded = on_recorded or (lambda: None)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        #: Whether the database may hold due copies this worker has not claimed: set at start, by
        #: wake() (mail spooled without a hand-over, a retry, a DSN) and by a full claim. Copies
        #: handed over in memory do not set it, so a busy relay does not claim in vain.
        self._db_due = True
        self._last_claim = 0.0
        self._dsn_wake = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task] = []
        self._recorder: Batcher[q.Outcome, None] = Batcher(self._record, name="outcome-writer",
                                                           linger=OUTCOME_LINGER_SECONDS)
        self._handed: asyncio.Queue[tuple[q.Spooled, list[q.Claimed]]] = asyncio.Queue()
        self._handed_copies = 0
        #: Ids of the copies claimed by this worker and not yet delivered: their leases are renewed.
        self._held: set[int] = set()
        self._renewer: asyncio.Task | None = None
        self.delivered = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Something new may be due in the database."""
        self._db_due = True
        self._wake.set()

    def start(self) -> None:
        self._recorder.start()
        lanes = getattr(self.upstream, "_cfg", None)
        n = lanes.max_connections if lanes is not None else self.config.upstream.max_connections
        self._tasks = [asyncio.create_task(self._lane(i), name=f"delivery-lane-{i}") for i in range(n)]
        self._tasks.append(asyncio.create_task(self._maintenance(), name="delivery-maintenance"))
        self._renewer = asyncio.create_task(self._renew(), name="lease-renewer")

    async def stop(self, grace: float = 10.0) -> None:
        """Finish the copies in hand (up to ``grace`` seconds), then stop."""
        self._stopping = True
        self._wake.set()
        self._dsn_wake.set()
        lanes = self._tasks[:-1]
        if lanes:
            done, pending = await asyncio.wait(lanes, timeout=grace)
            for t in pending:
                t.cancel()
        if self._tasks:
            await finish(self._tasks[-1])
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await cancel(self._renewer)
        await self._recorder.stop()
        try:
            await self._release_handed()
        except Exception as exc:  # their leases lapse and another start delivers them
            log.warning("could not release handed-over copies: %s", type(exc).__name__)
        await self.upstream.close()

    # -- hand-over from the relay in this process ------------------------------------------------

    def ready(self) -> bool:
        return not self._stopping and self._handed_copies < HANDOFF_MAX

    def lease(self) -> tuple[str, datetime]:
        return self.owner, utcnow() + timedelta(seconds=self.config.queue.lease_seconds)

    def take(self, message_pk: int, entry: SpoolEntry, copy_ids: list[int]) -> None:
        """Copies the relay just committed, claimed by us: no claim query, no reload of bytes."""
        msg = q.Spooled(message_pk, entry.kind, entry.message_id, entry.user, entry.mail_from,
                        entry.accepted_at, entry.raw)
        claimed = [q.Claimed(rid, message_pk, r.address, r.token, r.track_opens, r.track_clicks, 0, None)
                   for rid, r in zip(copy_ids, entry.recipients)]
        self._handed.put_nowait((msg, claimed))
        self._handed_copies += len(claimed)
        self._held.update(c.id for c in claimed)
        self._wake.set()

    async def _release_handed(self) -> None:
        """At shutdown: copies handed over but not started go back to the queue for the next start."""
        ids = []
        while not self._handed.empty():
            _, claimed = self._handed.get_nowait()
            ids += [c.id for c in claimed]
        self._held.difference_update(ids)
        if ids:
            async with self.sessionmaker() as session:
                async with session.begin():
                    await q.release(session, self.owner, ids)

    # -- the lanes ---------------------------------------------------------------------------

    async def _lane(self, index: int) -> None:
        while not self._stopping:
            try:
                await self._lane_step()
            except Exception as exc:  # e.g. the database gone while loading a batch: the copies
                # stay claimed, their leases lapse and they are claimed again; the lane lives on
                log.error("delivery lane %d: %s", index, type(exc).__name__)
                await asyncio.sleep(IDLE_POLL_SECONDS)

    async def _lane_step(self) -> None:
        """Deliver what was handed over, else claim from the database when something may be due
        there, else wait for a wake-up or the next poll."""
        if not self._handed.empty():
            batch: list[q.Claimed] = []
            messages: dict[int, q.Spooled] = {}
            while not self._handed.empty() and len(batch) < CLAIM_BATCH:
                msg, claimed = self._handed.get_nowait()
                self._handed_copies -= len(claimed)
                messages[msg.id] = msg
                batch += claimed
            await self._deliver_batch(batch, messages)
            return
        self._wake.clear()
        loop = asyncio.get_running_loop()
        since = loop.time() - self._last_claim
        if not self._db_due and since < IDLE_POLL_SECONDS:
            # Nothing new in the database (deferred copies come due with the next poll).
            try:
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_SECONDS - since)
            except asyncio.TimeoutError:
                pass
            return
        self._db_due = False
        self._last_claim = loop.time()
        try:
            claimed = await self._claim()
        except Exception:
            self._db_due = True
            raise
        if len(claimed) >= CLAIM_BATCH:
            self._db_due = True  # more may be waiting
        if claimed:
            await self._deliver_batch(claimed)

    async def _claim(self) -> list[q.Claimed]:
        async with self.sessionmaker() as session:
            async with session.begin():
                return await q.claim(session, self.owner, utcnow(), self.config.queue.lease_seconds,
                                     CLAIM_BATCH)

    async def _deliver_batch(self, claimed: list[q.Claimed], messages: dict[int, q.Spooled] | None = None) -> None:
        if messages is None:
            async with self.sessionmaker() as session:
                messages = await q.load_messages(session, {c.message_pk for c in claimed})
        self._held.update(c.id for c in claimed)
        try:
            for c in claimed:
                outcome = await self._deliver_one(c, messages.get(c.message_pk))
                # Not awaited: the lane goes on delivering while the outcome-writer commits.
                self._recorder.submit_nowait(outcome).add_done_callback(_recorded)
                self._held.discard(c.id)
        finally:
            self._held.difference_update(c.id for c in claimed)

    async def _renew(self) -> None:
        """Keep the leases of every copy this worker holds (handed over and waiting, or being
        delivered): one task for all of them, so a batch costs no task of its own."""
        period = max(1.0, self.config.queue.lease_seconds / 3)
        while True:
            await asyncio.sleep(period)
            ids = sorted(self._held)
            if not ids:
                continue
            until = utcnow() + timedelta(seconds=self.config.queue.lease_seconds)
            try:
                async with self.sessionmaker() as session:
                    async with session.begin():
                        for i in range(0, len(ids), 1000):
                            await q.renew(session, self.owner, ids[i:i + 1000], until)
            except Exception as exc:
                log.warning("lease renewal failed: %s", type(exc).__name__)

    async def _deliver_one(self, c: q.Claimed, msg: q.Spooled | None) -> q.Outcome:
        outcome = await self._attempt(c, msg)
        return dataclasses.replace(outcome, attempts=c.attempts + 1)

    async def _attempt(self, c: q.Claimed, msg: q.Spooled | None) -> q.Outcome:
        now = utcnow()
        if msg is None or msg.raw is None:
            return q.Outcome(c.id, c.message_pk, msg.user if msg else None, "bounced",
                             "554 5.3.0 Spooled message is missing", dsn_wanted=False)
        wants_dsn = msg.kind == "mail" and bool(msg.mail_from)
        expiry = msg.accepted_at + timedelta(hours=self.config.queue.max_age_hours)
        if now >= expiry:
            return q.Outcome(c.id, c.message_pk, msg.user, "bounced",
                             "4.4.7 Message expired in queue" + _last(c), dsn_wanted=wants_dsn)
        try:
            data, note = self.render(msg.raw, msg, c)
        except Exception as exc:  # fail open: deliver as it came
            data, note = msg.raw, f"render failed: {type(exc).__name__}"
        try:
            result = await self.upstream.send(msg.mail_from, c.address, data)
        except Exception as exc:  # a fault of ours: the copy waits for a retry, the lane goes on
            log.error("delivery attempt failed: %s", type(exc).__name__)  # no text: it may hold addresses
            result = Result("deferred", f"451 4.3.0 Internal error ({type(exc).__name__})")
        if result.status == "sent":
            self.delivered += 1
            return q.Outcome(c.id, c.message_pk, msg.user, "sent", result.reply, render_note=note)
        if result.status == "bounced":
            return q.Outcome(c.id, c.message_pk, msg.user, "bounced", result.reply,
                             dsn_wanted=wants_dsn, render_note=note)
        retry_at = now + timedelta(seconds=backoff(self.config, c.attempts))
        if retry_at >= expiry:
            return q.Outcome(c.id, c.message_pk, msg.user, "bounced",
                             f"4.4.7 Message expired in queue; last reply: {result.reply}",
                             dsn_wanted=wants_dsn, render_note=note)
        return q.Outcome(c.id, c.message_pk, msg.user, "deferred", result.reply,
                         next_attempt_at=retry_at, render_note=note)

    async def _record(self, outcomes: list[q.Outcome]) -> list[None]:
        await q.record_committed(self._engine, outcomes, utcnow())
        self.on_recorded()
        if any(o.status == "bounced" and o.dsn_wanted for o in outcomes):
            self._dsn_wake.set()  # only now is the bounce committed for the DSN writer to see
        return [None] * len(outcomes)

    # -- DSNs and purge ----------------------------------------------------------------------

    async def _maintenance(self) -> None:
        last_purge = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            # Cleared before the work, not after: a wake-up that comes during it (a bounce to
            # answer, or stop()) is then not lost for MAINTENANCE_SECONDS.
            self._dsn_wake.clear()
            try:
                if await self.write_dsns():
                    self.wake()
                if loop.time() - last_purge > 3600:
                    await self.purge()
                    await self.erase_old_event_data()
                    last_purge = loop.time()
            except Exception as exc:
                log.error("maintenance failed: %s", type(exc).__name__)
            try:
                await asyncio.wait_for(self._dsn_wake.wait(), MAINTENANCE_SECONDS)
            except asyncio.TimeoutError:
                pass

    async def write_dsns(self) -> int:
        """Queue one DSN per message for its bounced copies; returns how many were written."""
        written = 0
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
                    await add_entries(session, [SpoolEntry(
                        kind="dsn", message_id=_message_id(raw), user=orig.user,
                        mail_from=self.config.queue.dsn_from, raw=raw,
                        recipients=[SpoolRecipient(orig.mail_from, None, False, False, False, ["dsn"])],
                        subject="Undelivered Mail Returned to Sender")])
                    await q.mark_dsn(session, [r.id for r in copies], "sent")
                    written += 1
        return written

    async def erase_old_event_data(self) -> int:
        days = self.config.privacy.event_retention_days
        if not days:
            return 0
        async with self.sessionmaker() as session:
            async with session.begin():
                return await erase_raw_before(session, utcnow() - timedelta(days=days))

    async def purge(self) -> int:
        cutoff = utcnow() - timedelta(days=self.config.queue.keep_delivered_days)
        async with self.sessionmaker() as session:
            async with session.begin():
                return await q.purge_delivered(session, cutoff)


def _recorded(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        # The copy stays claimed; once its lease lapses it is delivered again (at least once)
        # and the reclaim is counted.
        log.error("recording a delivery outcome failed: %s", type(fut.exception()).__name__)


def _last(c: q.Claimed) -> str:
    tries = f" after {c.attempts} attempts" if c.attempts else ""
    return f"{tries}; last reply: {c.last_reply}" if c.last_reply else tries


def _message_id(raw: bytes) -> str:
    from relay.message import get
    return get(raw, "message-id") or ""

