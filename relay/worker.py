"""The delivery worker's lanes: claim → render → deliver → record, one copy per recipient.

Lanes (one per upstream connection) take what the relay in this process handed over
(``relay.handoff``), else claim small batches from the database, and deliver them one by one over
their pooled connection; outcomes go to a group-commit writer so a commit serves every lane,
retried until written. The rest of what a worker does is beside it: the hand-off, heartbeat and
lease renewal (``relay.handoff.Handoff``), DSNs and the purge (``relay.maintenance``), retention
erasure (``relay.privacy``); ``trackrelay.service`` wires them.

Each attempt writes one line on the mail log (logger ``trackrelay.mail``), found by the queue
id of the ``250 … queued as N`` reply: ``queue_id=N copy=N.K to=… status=… reply="…"
delay=…``; recipient addresses as ``log.recipients`` says, never a Never Log recipient's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from datetime import timedelta
from typing import Callable, Protocol

from sqlalchemy.ext.asyncio import async_sessionmaker

from relay import maillog
from relay.handoff import Handoff
from relay.upstream import Result
from storage import queue as q
from storage.engine import engine_of
from storage.models import utcnow
from core.batcher import Batcher, transient
from core.config import Config

log = logging.getLogger("trackrelay.worker")
#: The mail log: one line per delivery attempt, greppable by queue id.
mail_log = maillog.log

CLAIM_BATCH = 32
IDLE_POLL_SECONDS = 1.0
#: Outcomes are committed together after up to this long: lanes do not wait for the commit (the
#: copy stays claimed under its lease until it is written), so a short wait buys larger batches.
OUTCOME_LINGER_SECONDS = 0.02
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
    """The delivery lanes of this process, delivering the copies ``handoff`` holds for it."""

    def __init__(self, config: Config, sessionmaker: async_sessionmaker, upstream: Upstream,
                 render: Renderer = plain_renderer, owner: str | None = None,
                 on_recorded: Callable[[], None] | None = None, handoff: Handoff | None = None):
        self.config = config
        self.sessionmaker = sessionmaker
        self._engine = engine_of(sessionmaker)
        self.handoff = handoff if handoff is not None else Handoff(config, sessionmaker, owner)
        self.handoff.on_taken = self._taken
        self.handoff.on_freed = self.wake
        self.upstream = upstream
        self.render = render
        self.on_recorded = on_recorded or (lambda: None)
        #: Called once a bounce that wants a DSN is committed: the maintenance's wake-up.
        self.on_bounced: Callable[[], None] = lambda: None
        #: Called after each attempt with (copy, message, outcome, seconds): the metrics' hook.
        self.on_attempt: Callable[[q.Claimed, q.Spooled | None, q.Outcome, float], None] | None = None
        self._recipients_shown = maillog.recipients_mode(config)
        self._wake = asyncio.Event()
        #: Whether the database may hold due copies this worker has not claimed: set at start, by
        #: wake() (mail spooled without a hand-over, a retry, a DSN, freed claims) and by a full
        #: claim. Copies handed over in memory do not set it, so a busy relay does not claim in vain.
        self._db_due = True
        self._last_claim = 0.0
        self._stopping = False
        self._tasks: list[asyncio.Task] = []
        self._recorder: Batcher[q.Outcome, None] = Batcher(self._record, name="outcome-writer",
                                                           linger=OUTCOME_LINGER_SECONDS)
        self.delivered = 0

    @property
    def owner(self) -> str:
        """Whose claims these are (``Handoff.owner``: host, pid and a random part)."""
        return self.handoff.owner

    # -- lifecycle ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Something new may be due in the database."""
        self._db_due = True
        self._wake.set()

    def _taken(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._recorder.start()
        lanes = getattr(self.upstream, "_cfg", None)
        n = lanes.max_connections if lanes is not None else self.config.upstream.max_connections
        self._tasks = [asyncio.create_task(self._lane(i), name=f"delivery-lane-{i}") for i in range(n)]

    async def stop(self, grace: float = 10.0) -> None:
        """Finish the copies in hand (up to ``grace`` seconds) and write their outcomes; then
        the hand-off gives back the rest (``Handoff.stop``) and ``close`` closes the upstream."""
        self._stopping = True
        self.handoff.close()
        self._wake.set()
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=grace)
            for t in pending:
                t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # The heartbeat goes on while outcomes are written: until they are, the claims must hold.
        await self._recorder.stop()

    async def close(self) -> None:
        await self.upstream.close()

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
        h = self.handoff
        if h.handed():
            batch, messages = h.next_handed(CLAIM_BATCH)
            await self._deliver_batch(batch, messages)
            return
        self._wake.clear()
        loop = asyncio.get_running_loop()
        since = loop.time() - self._last_claim
        if not self._db_due and since < IDLE_POLL_SECONDS or not h.claims_hold():
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
        h = self.handoff
        h.hold(c.id for c in claimed)
        if messages is None:
            loaded = await self._load(claimed)
            if loaded is None:  # stopping: given back untried
                h.give_back(claimed)
                return
            messages, claimed = loaded
        for i, c in enumerate(claimed):
            if not h.claims_hold():
                # Our heartbeat is failing: the others may soon judge us dead and free these
                # copies. Start no transfer until it succeeds again.
                while not h.claims_hold() and not self._stopping:
                    await asyncio.sleep(0.1)
                if self._stopping:
                    h.give_back(claimed[i:])
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
            self.handoff.written(rid)
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
            self.on_bounced()  # only now is the bounce committed for the DSN writer to see
        return [None] * len(outcomes)


# -- helpers ------------------------------------------------------------------------------------

def _last(c: q.Claimed) -> str:
    tries = f" after {c.attempts} attempts" if c.attempts else ""
    return f"{tries}; last reply: {c.last_reply}" if c.last_reply else tries
