"""The hand-off and the lease renewer: the copies this process's worker holds, and why they stay its own.

Copies come to the worker two ways: handed over by the relay in this process the moment they are
committed (``take``: already claimed, no claim query, no reload of the bytes), or claimed from the
database by a lane. Either way they are held (``hold``) until their outcome is written.

Claims belong to this process (``owner``) and hold while its heartbeat row moves (one task
renews it every ``heartbeat_seconds``, and the copies' leases with it). At start the claims of
dead predecessors are freed: on SQLite, which has one worker by design, every claim found; on
PostgreSQL those of workers on this machine whose process is gone. While running, a PostgreSQL
worker watches the others' heartbeats: one that stood still through ``STALE_BEATS`` of our own
renewals is dead, and its copies are freed for delivery. A slow or locked database never frees a
claim of a live worker (a stall stops every heartbeat alike and counts as one renewal, not
several); a worker whose own heartbeat has failed for half that long starts no new transfer
(``claims_hold``), since the others may be about to judge it dead. So a copy is delivered twice
only if its worker dies (or is cut off from the database as if dead) between the upstream's 250
and the commit of the outcome, and each freed claim is counted in ``recipients.reclaims``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from datetime import datetime, timedelta
from typing import Callable

from sqlalchemy.ext.asyncio import async_sessionmaker

from relay import maillog
from storage import queue as q
from core.aio import cancel
from storage.engine import engine_of
from storage.models import utcnow
from storage.spool import SpoolEntry
from core.config import Config

log = logging.getLogger("trackrelay.worker")

HANDOFF_MAX = 2000  # copies waiting in memory; beyond that new mail is claimed from the database
#: How often a worker renews its heartbeat (and, every lease_seconds / 3, its copies' leases).
HEARTBEAT_SECONDS = 2.0
#: Another worker is dead once its heartbeat stood still through this many of our renewals.
STALE_BEATS = 3
#: Every this many heartbeats, claims of owners without a heartbeat row whose leases lapsed are freed.
ORPHAN_SCAN_BEATS = 15


class Handoff:
    """What this process's worker holds: copies handed over in memory, claimed copies in hand,
    its heartbeat and the leases it renews."""

    def __init__(self, config: Config, sessionmaker: async_sessionmaker, owner: str | None = None):
        self.config = config
        self.sessionmaker = sessionmaker
        #: SQLite has one worker by design: every claim not ours is a dead predecessor's.
        self._sole = engine_of(sessionmaker).dialect.name == "sqlite"
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.heartbeat_seconds = min(HEARTBEAT_SECONDS, config.queue.lease_seconds / 3)
        #: Called when copies were handed over (the lanes wake) and when claims of dead workers
        #: were freed (something new is due in the database).
        self.on_taken: Callable[[], None] = lambda: None
        self.on_freed: Callable[[], None] = lambda: None
        self._closing = False
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
        self.freed = 0  # claims of dead workers this one freed

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._beat_ok = asyncio.get_running_loop().time()
        self._heartbeat = asyncio.create_task(self._heartbeats(), name="worker-heartbeat")

    def close(self) -> None:
        """No more hand-overs (the worker is stopping)."""
        self._closing = True

    async def stop(self) -> None:
        """Once the outcomes in hand are written: the heartbeat ends, what is still held goes back."""
        self._closing = True
        await cancel(self._heartbeat)
        for task in list(self._side_tasks):
            await cancel(task)
        try:
            await self._retire()
        except Exception as exc:  # freed when a worker starts next (or sees this one dead)
            log.warning("could not give back the copies in hand: %s", maillog.error(exc))

    # -- hand-over from the relay in this process ------------------------------------------------

    def ready(self) -> bool:
        return not self._closing and self._handed_copies < HANDOFF_MAX

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
        self.on_taken()

    # -- what the lanes ask ----------------------------------------------------------------------

    def handed(self) -> bool:
        """Are copies waiting in memory?"""
        return not self._handed.empty()

    def next_handed(self, limit: int) -> tuple[list[q.Claimed], dict[int, q.Spooled]]:
        """Up to about ``limit`` copies handed over (whole messages), and their messages."""
        batch: list[q.Claimed] = []
        messages: dict[int, q.Spooled] = {}
        while not self._handed.empty() and len(batch) < limit:
            msg, claimed = self._handed.get_nowait()
            self._handed_copies -= len(claimed)
            if msg is not None:
                messages[msg.id] = msg
            batch += claimed
        return batch, messages

    def give_back(self, claimed: list[q.Claimed]) -> None:
        """Copies not started (the worker is stopping): released untried at stop."""
        self._handed.put_nowait((None, claimed))

    def hold(self, ids) -> None:
        self._held.update(ids)

    def written(self, rid: int) -> None:
        """The copy's outcome is committed (or will never be): its lease is no longer renewed."""
        self._held.discard(rid)

    def claims_hold(self) -> bool:
        """May this worker start a transfer? Not when its heartbeat has failed for half the time
        after which the others would judge it dead (they may then free its claims)."""
        if self._sole:
            return True
        quiet = asyncio.get_running_loop().time() - self._beat_ok
        return quiet < STALE_BEATS * self.heartbeat_seconds / 2

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
        self.on_freed()

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
