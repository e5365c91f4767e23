"""The delivery worker: claim → render → deliver → record, one copy per recipient.

Lanes (one per upstream connection) claim small batches and deliver them one by one over their
pooled connection; outcomes go to a group-commit writer so a commit serves every lane, retried
until written. A separate loop writes DSNs for bounced copies and purges old spooled bytes.

Claims belong to this process (``owner``) and hold while its heartbeat row moves (one task
renews it every ``heartbeat_seconds``, and the copies' leases with it). At start the claims of
dead predecessors are freed: on SQLite, which has one worker by design, every claim found; on
PostgreSQL those of workers on this machine whose process is gone. While running, a PostgreSQL
worker watches the others' heartbeats: one that stood still through ``STALE_BEATS`` of our own
renewals is dead, and its copies are freed for delivery. A slow or locked database never frees a
claim of a live worker (a stall stops every heartbeat alike and counts as one renewal, not
several); a worker whose own heartbeat has failed for half that long starts no new transfer,
since the others may be about to judge it dead. So a copy is delivered twice only if its worker
dies (or is cut off from the database as if dead) between the upstream's 250 and the commit of
the outcome, and each freed claim is counted in ``recipients.reclaims``.

Each attempt writes one line on the mail log (logger ``trackrelay.mail``), found by the queue
id of the ``250 … queued as N`` reply: ``queue_id=N copy=N.K to=… status=… reply="…"
delay=…``; recipient addresses as ``log.recipients`` says, never a Never Log recipient's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
import uuid
from datetime import datetime, timedelta
from typing import Callable, Protocol

from sqlalchemy.ext.asyncio import async_sessionmaker

from relay import dsn, maillog
from relay.upstream import Result
from storage import queue as q
from core.aio import cancel, finish
from storage.engine import engine_of
from storage.events import erase_raw_before
from storage.models import utcnow
from storage.spool import Batcher, SpoolEntry, SpoolRecipient, add_entries, transient
from core.config import Config

log = logging.getLogger("trackrelay.worker")
#: The mail log: one line per delivery attempt and DSN, greppable by queue id.
mail_log = maillog.log

CLAIM_BATCH = 32
HANDOFF_MAX = 2000  # copies waiting in memory; beyond that new mail is claimed from the database
IDLE_POLL_SECONDS = 1.0
MAINTENANCE_SECONDS = 30.0
#: Outcomes are committed together after up to this long: lanes do not wait for the commit (the
#: copy stays claimed under its lease until it is written), so a short wait buys larger batches.
OUTCOME_LINGER_SECONDS = 0.02
#: How often a worker renews its heartbeat (and, every lease_seconds / 3, its copies' leases).
HEARTBEAT_SECONDS = 2.0
#: Another worker is dead once its heartbeat stood still through this many of our renewals.
STALE_BEATS = 3
#: Every this many heartbeats, claims of owners without a heartbeat row whose leases lapsed are freed.
ORPHAN_SCAN_BEATS = 15
#: Retries of an outcome's commit back off up to this.
RECORD_RETRY_MAX_SECONDS = 5.0


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
        #: SQLite has one worker by design: every claim not ours is a dead predecessor's.
        self._sole = self._engine.dialect.name == "sqlite"
        self.upstream = upstream
        self.render = render
        self.on_recorded = on_recorded or (lambda: None)
        #: Called after each attempt with (copy, message, outcome, seconds): the metrics' hook.
        self.on_attempt: Callable[[q.Claimed, q.Spooled | None, q.Outcome, float], None] | None = None
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.heartbeat_seconds = min(HEARTBEAT_SECONDS, config.queue.lease_seconds / 3)
        self._recipients_shown = maillog.recipients_mode(config)
        self._wake = asyncio.Event()
        #: Whether the database may hold due copies this worker has not claimed: set at start, by
        #: wake() (mail spooled without a hand-over, a retry, a DSN, freed claims) and by a full
        #: claim. Copies handed over in memory do not set it, so a busy relay does not claim in vain.
        self._db_due = True
        self._last_claim = 0.0
        self._dsn_wake = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task] = []
        self._recorder: Batcher[q.Outcome, None] = Batcher(self._record, name="outcome-writer",
                                                           linger=OUTCOME_LINGER_SECONDS)
        self._handed: asyncio.Queue[tuple[q.Spooled | None, list[q.Claimed]]] = asyncio.Queue()
        self._handed_copies = 0
        #: Ids of the copies claimed by this worker whose outcome is not yet committed: their
        #: leases are renewed.
        self._held: set[int] = set()
        self._heartbeat: asyncio.Task | None = None
        self._side_tasks: set[asyncio.Task] = set()
        #: loop.time() when the last heartbeat that succeeded was sent.
        self._beat_ok = 0.0
        #: Other workers' heartbeats: owner -> (beats, our renewals it stood still through, since).
        self._seen: dict[str, tuple[int, int, float]] = {}
        self._machine = ""
        self._pid_started = ""
        self.delivered = 0
        self.freed = 0  # claims of dead workers this one freed

    # -- lifecycle ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Something new may be due in the database."""
        self._db_due = True
        self._wake.set()

    def start(self) -> None:
        self._beat_ok = asyncio.get_running_loop().time()
        self._recorder.start()
        lanes = getattr(self.upstream, "_cfg", None)
        n = lanes.max_connections if lanes is not None else self.config.upstream.max_connections
        self._tasks = [asyncio.create_task(self._lane(i), name=f"delivery-lane-{i}") for i in range(n)]
        self._tasks.append(asyncio.create_task(self._maintenance(), name="delivery-maintenance"))
        self._heartbeat = asyncio.create_task(self._heartbeats(), name="worker-heartbeat")

    async def stop(self, grace: float = 10.0) -> None:
        """Finish the copies in hand (up to ``grace`` seconds), write their outcomes, give back
        the rest, then stop."""
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
        # The heartbeat goes on while outcomes are written: until they are, the claims must hold.
        await self._recorder.stop()
        await cancel(self._heartbeat)
        for task in list(self._side_tasks):
            await cancel(task)
        try:
            await self._retire()
        except Exception as exc:  # freed when a worker starts next (or sees this one dead)
            log.warning("could not give back the copies in hand: %s", maillog.error(exc))
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
        claimed = [q.Claimed(rid, message_pk, r.address, r.token, r.track_opens, r.track_clicks, 0, None,
                             r.never_log, n)
                   for n, (rid, r) in enumerate(zip(copy_ids, entry.recipients), 1)]
        self._handed.put_nowait((msg, claimed))
        self._handed_copies += len(claimed)
        self._held.update(c.id for c in claimed)
        self._wake.set()

    async def _retire(self) -> None:
        """At shutdown: copies handed over but not started go back to the queue untried; what is
        still claimed after that (a transfer cut short, an outcome never written) goes back as a
        reclaim; the heartbeat row goes."""
        ids = []
        while not self._handed.empty():
            _, claimed = self._handed.get_nowait()
            ids += [c.id for c in claimed]
        async with self.sessionmaker() as session:
            async with session.begin():
                if ids:
                    await q.release(session, self.owner, ids)
                cut = await q.free_claims_of(session, [self.owner])
        self._held.clear()
        if cut:
            log.warning("%d copies were in transfer at stop: queued again, each may be delivered twice", cut)

    # -- heartbeats ------------------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        """Enlist, then renew the heartbeat (and, every lease_seconds / 3, the copies' leases);
        on PostgreSQL judge the other workers' heartbeats and free the claims of the dead."""
        loop = asyncio.get_running_loop()
        await self._enlist()
        renewed = loop.time()
        rounds = 0
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            try:  # this task must outlive any fault: without it the others judge us dead
                peers = await self._beat()
                if peers is not None and not self._sole:
                    rounds += 1
                    dead = await self._judge(peers)
                    if dead or rounds % ORPHAN_SCAN_BEATS == 0:
                        self._side(self._free(dead, orphans=rounds % ORPHAN_SCAN_BEATS == 0), "free-claims")
                if loop.time() - renewed >= self.config.queue.lease_seconds / 3 and self._held:
                    renewed = loop.time()
                    self._side(self._renew(), "lease-renewal")
            except Exception as exc:
                log.error("worker heartbeat: %s", maillog.error(exc))

    def _side(self, coro, name: str) -> None:
        """Work that must not hold up the heartbeat (it may wait for row locks), one of a kind at a time."""
        if any(t.get_name() == name for t in self._side_tasks):
            coro.close()
            return
        task = asyncio.create_task(coro, name=name)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _enlist(self) -> None:
        """Our heartbeat row, and the claims of dead predecessors freed."""
        loop = asyncio.get_running_loop()
        self._machine, self._pid_started = await asyncio.to_thread(_this_machine)
        while True:
            started = loop.time()
            try:
                async with self.sessionmaker() as session:
                    async with session.begin():
                        if not await q.beat(session, self.owner, utcnow()):  # not enlisted by a try
                            await self._register(session)                   # whose answer was lost
                        if self._sole:
                            freed = await q.free_claims_but(session, self.owner)
                        else:
                            peers = await q.heartbeats(session)
                            gone = [b.owner for b in peers if b.owner != self.owner
                                    and await asyncio.to_thread(self._gone, b)]
                            freed = await q.free_claims_of(session, gone)
                break
            except Exception as exc:
                log.warning("worker heartbeat: could not enlist: %s", maillog.error(exc))
                await asyncio.sleep(self.heartbeat_seconds)
        self._beat_ok = started
        if freed:
            self._freed(freed, "at start")

    async def _register(self, session) -> None:
        await q.register(session, self.owner, socket.gethostname(), self._machine, os.getpid(),
                         self._pid_started, utcnow())

    async def _beat(self) -> list[q.Beat] | None:
        """Renew our heartbeat; the others' heartbeats (PostgreSQL), or None when it failed."""
        started = asyncio.get_running_loop().time()
        try:
            async with self.sessionmaker() as session:
                async with session.begin():
                    alive = await q.beat(session, self.owner, utcnow())
                    if not alive:
                        await self._register(session)
                    peers = [] if self._sole else await q.heartbeats(session)
        except Exception as exc:
            log.warning("worker heartbeat failed: %s", maillog.error(exc))
            return None
        if not alive:
            log.error("this worker's heartbeat row was gone (another worker judged it dead and freed "
                      "its claims): copies it was sending may be delivered twice")
        self._beat_ok = started
        return peers

    def _shown(self, c: q.Claimed) -> str:
        """How addresses of this copy's lines are shown: never at all for a Never Log recipient."""
        return "none" if c.never_log else self._recipients_shown

    def _log_attempt(self, c: q.Claimed, msg: q.Spooled | None, outcome: q.Outcome) -> None:
        if not mail_log.isEnabledFor(logging.INFO):
            return
        mode = self._shown(c)
        delay = (utcnow() - msg.accepted_at).total_seconds() if msg is not None else 0.0
        mail_log.info("queue_id=%d copy=%d.%d to=%s status=%s reply=%s delay=%.2f attempt=%d%s",
                      c.message_pk, c.message_pk, c.number, maillog.shown(c.address, mode), outcome.status,
                      maillog.quoted(maillog.masked(outcome.reply, mode)), delay, outcome.attempts,
                      f" next_attempt={outcome.next_attempt_at:%Y-%m-%dT%H:%M:%SZ}"
                      if outcome.next_attempt_at is not None else "")

    def _claims_hold(self) -> bool:
        """May this worker start a transfer? Not when its heartbeat has failed for half the time
        after which the others would judge it dead (they may then free its claims)."""
        if self._sole:
            return True
        quiet = asyncio.get_running_loop().time() - self._beat_ok
        return quiet < STALE_BEATS * self.heartbeat_seconds / 2

    async def _judge(self, peers: list[q.Beat]) -> list[str]:
        """The other workers that are dead: gone from this machine, or whose heartbeat stood still
        through STALE_BEATS of our renewals (each of which succeeded) and as many intervals."""
        now = asyncio.get_running_loop().time()
        dead = []
        present = set()
        for b in peers:
            if b.owner == self.owner:
                continue
            present.add(b.owner)
            seen = self._seen.get(b.owner)
            if seen is None or seen[0] != b.beats:
                self._seen[b.owner] = (b.beats, 0, now)
                continue
            beats, still, since = seen
            still += 1
            self._seen[b.owner] = (beats, still, since)
            if still >= STALE_BEATS and now - since >= STALE_BEATS * self.heartbeat_seconds:
                dead.append(b.owner)
            elif await asyncio.to_thread(self._gone, b):
                dead.append(b.owner)
        for owner in set(self._seen) - present:
            del self._seen[owner]
        return dead

    def _gone(self, b: q.Beat) -> bool:
        """Is this worker's process known to be gone (it ran on this machine)? (In a thread: /proc.)"""
        if not self._machine or b.machine != self._machine or not b.pid:
            return False
        try:
            os.kill(b.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return bool(b.pid_started) and _process_started(b.pid) != b.pid_started

    async def _free(self, dead: list[str], orphans: bool) -> None:
        dead = [d for d in dead if d != self.owner]  # never our own: this process is alive
        try:
            async with self.sessionmaker() as session:
                async with session.begin():
                    freed = await q.free_claims_of(session, dead)
                    if orphans:
                        freed += await q.free_orphans(session, utcnow())
        except Exception as exc:
            log.warning("could not free the claims of dead workers: %s", maillog.error(exc))
            return
        for owner in dead:
            self._seen.pop(owner, None)
            log.warning("worker %s is dead (its heartbeat stood still): its claims are free", owner)
        if freed:
            self._freed(freed, "of dead workers")

    def _freed(self, n: int, what: str) -> None:
        self.freed += n
        log.warning("%d copies claimed %s queued again; each may have been delivered already "
                    "(counted in recipients.reclaims)", n, what)
        self.wake()

    async def _renew(self) -> None:
        """Move the leases of every copy this worker holds (handed over and waiting, or being
        delivered, or its outcome being written): they matter to workers that predate heartbeats."""
        ids = sorted(self._held)
        until = utcnow() + timedelta(seconds=self.config.queue.lease_seconds)
        try:
            async with self.sessionmaker() as session:
                async with session.begin():
                    for i in range(0, len(ids), 1000):
                        await q.renew(session, self.owner, ids[i:i + 1000], until)
        except Exception as exc:
            log.warning("lease renewal failed: %s", maillog.error(exc))

    # -- the lanes ---------------------------------------------------------------------------

    async def _lane(self, index: int) -> None:
        while not self._stopping:
            try:
                await self._lane_step()
            except Exception as exc:  # e.g. the database gone while claiming: the lane lives on
                log.error("delivery lane %d: %s", index, maillog.error(exc))
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
                if msg is not None:
                    messages[msg.id] = msg
                batch += claimed
            await self._deliver_batch(batch, messages)
            return
        self._wake.clear()
        loop = asyncio.get_running_loop()
        since = loop.time() - self._last_claim
        if not self._db_due and since < IDLE_POLL_SECONDS or not self._claims_hold():
            # Nothing new in the database (deferred copies come due with the next poll).
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.05, IDLE_POLL_SECONDS - since))
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
        self._held.update(c.id for c in claimed)
        if messages is None:
            loaded = await self._load(claimed)
            if loaded is None:  # stopping: given back untried
                self._handed.put_nowait((None, claimed))
                return
            messages, claimed = loaded
        for i, c in enumerate(claimed):
            if not self._claims_hold():
                # Our heartbeat is failing: the others may soon judge us dead and free these
                # copies. Start no transfer until it succeeds again.
                while not self._claims_hold() and not self._stopping:
                    await asyncio.sleep(0.1)
                if self._stopping:
                    self._handed.put_nowait((None, claimed[i:]))
                    return
            msg = messages.get(c.message_pk)
            began = time.monotonic()
            outcome = await self._deliver_one(c, msg)
            self._log_attempt(c, msg, outcome)
            if self.on_attempt is not None:  # metrics: outcome counts and latency histograms
                self.on_attempt(c, msg, outcome, time.monotonic() - began)
            # Not awaited: the lane goes on delivering while the outcome-writer commits. The copy
            # stays held (claimed, its lease renewed) until its outcome is written.
            self._recorder.submit_nowait(outcome).add_done_callback(self._recorded(c.id))

    async def _load(self, claimed: list[q.Claimed]) -> tuple[dict[int, q.Spooled], list[q.Claimed]] | None:
        """The claimed copies' messages (and their copy numbers, for the mail log): retried while
        the database fails, since the copies are ours until delivered."""
        pks = {c.message_pk for c in claimed}
        while True:
            try:
                async with self.sessionmaker() as session:
                    messages = await q.load_messages(session, pks)
                    if mail_log.isEnabledFor(logging.INFO):
                        numbers = await q.copy_numbers(session, pks)
                        claimed = [dataclasses.replace(c, number=numbers.get(c.id, 0)) for c in claimed]
                return messages, claimed
            except Exception as exc:
                log.error("loading %d claimed copies failed, retrying: %s", len(claimed), maillog.error(exc))
                if self._stopping:
                    return None
                await asyncio.sleep(IDLE_POLL_SECONDS)
                if self._stopping:
                    return None

    def _recorded(self, rid: int) -> Callable[[asyncio.Future], None]:
        def done(fut: asyncio.Future) -> None:
            self._held.discard(rid)
            if not fut.cancelled() and fut.exception() is not None:
                # Not written (the database refused it, or the worker stopped first): the copy
                # stays claimed by this worker until it stops or dies, then it is freed.
                log.error("recording a delivery outcome failed: %s", maillog.error(fut.exception()))
        return done

    async def _deliver_one(self, c: q.Claimed, msg: q.Spooled | None) -> q.Outcome:
        outcome = await self._attempt(c, msg)
        return dataclasses.replace(outcome, attempts=c.attempts + 1, owner=self.owner)

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
            log.error("queue_id=%d copy=%d.%d: rendering failed, delivered as it came: %s", c.message_pk,
                      c.message_pk, c.number, maillog.error(exc, self._shown(c)))
        try:
            result = await self.upstream.send(msg.mail_from, c.address, data)
        except Exception as exc:  # a fault of ours: the copy waits for a retry, the lane goes on
            log.error("queue_id=%d copy=%d.%d: delivery attempt failed: %s", c.message_pk, c.message_pk,
                      c.number, maillog.error(exc, self._shown(c)))
            # The stored reply names the class only: it may go into a DSN.
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
        """Commit outcomes; while the database fails, again and again: the copies stay this
        worker's meanwhile, and an upstream's 250 is never followed by a second delivery."""
        delay = 0.1
        while True:
            try:
                await q.record_committed(self._engine, outcomes, utcnow())
                break
            except Exception as exc:
                if not transient(exc):
                    raise
                log.warning("writing %d delivery outcomes failed, retrying in %.1f s: %s", len(outcomes),
                            delay, maillog.error(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECORD_RETRY_MAX_SECONDS)
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
                log.error("maintenance failed: %s", maillog.error(exc))
            try:
                await asyncio.wait_for(self._dsn_wake.wait(), MAINTENANCE_SECONDS)
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
                        kind="dsn", message_id=_message_id(raw), user=orig.user,
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


# -- the mail log ---------------------------------------------------------------------------------

def _this_machine() -> tuple[str, str]:
    """(boot id and PID namespace, this process's start time): what tells whether a pid on this
    machine is still the worker it was. Empty where /proc does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        machine = f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return "", ""
    return machine, _process_started(os.getpid())


def _process_started(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]  # field 22, starttime, after "pid (comm)"


def _last(c: q.Claimed) -> str:
    tries = f" after {c.attempts} attempts" if c.attempts else ""
    return f"{tries}; last reply: {c.last_reply}" if c.last_reply else tries


def _message_id(raw: bytes) -> str:
    from relay.message import get
    return get(raw, "message-id") or ""

