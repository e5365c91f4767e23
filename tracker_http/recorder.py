"""Buffered, batched, idempotent recording of opens and clicks.

The pixel and click handlers only append a ``Hit`` to a bounded in-memory buffer and answer at
once; they never wait for the database. A flush loop resolves tokens, classifies, infers opens and
writes batches. If the database is down, hits stay buffered and are written when it is back; each
hit carries a unique key so a batch retried after an unclear failure writes nothing twice. What
does not fit in the buffer is counted (``dropped``) and logged, never silently lost.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import operator
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import async_sessionmaker

from core.aio import finish
from core.config import Config
from core.events import Classification, Event, EventType, human_sequence
from storage import events as ev
from storage.engine import engine_of
from tracker_http.classify import BURST_SECONDS, HUMAN, client_of, request_verdict, timing_verdict
from tracker_http.netaddr import RangeSet, stored_ip

log = logging.getLogger("trackrelay.tracker")

BUFFER_MAX = 100_000
BATCH_MAX = 1000
#: A batch of fewer than BATCH_MAX waits this long after the last one, also under load: a batch's
#: fixed costs (its commit, token look-up and contact updates) are shared by the interval's events
#: instead of paid again for whatever came in during the last write.
FLUSH_INTERVAL = 0.05
HUMAN_CACHE_MAX = 200_000
#: How long a recipient's human history read from the database is trusted, with this recorder's
#: own writes added since. Only other writers can make it stale — another tracker process, the
#: relay recording a reply's inferred open — and then a `first` or an inferred open may be doubled
#: within this window (two tracker processes race so anyway); without it every batch asked again
#: about every recipient who opened but never clicked — most of them.
HISTORY_TTL = 10.0
REQUEST_CACHE_MAX = 8192
#: An idempotency key is the prefix and ``KEY_BASE`` + the hit's position in decimal: 13 digits for
#: any position a process reaches, so the keys of one process sort as their positions do and
#: each lands at the end of the unique index (str() of an int: an f-string's ``:012x`` cost
#: ~1,200 instructions a hit more; unpadded decimal would scatter them over the index's pages).
KEY_BASE = 10**12


#: One pixel fetch or click as a handler saw it, buffered until written: a plain tuple, one per
#: request (building a class instance with an aware datetime cost the handler ~2 µs more)
#: ``(kind, token, method, ip, user_agent, at, url, link_index)`` — kind ``open`` or ``click``,
#: ``at`` in epoch seconds (``time.time()``), url and link_index None for an open.
Hit = tuple


def new_key_prefix() -> str:
    """The idempotency keys' prefix: unique to one process start."""
    return secrets.token_hex(8) + "."


def dropped(stats: "Stats") -> None:
    """A hit that found the buffer full: counted, and logged now and then."""
    stats.dropped += 1
    if stats.dropped in (1, 10, 100) or stats.dropped % 1000 == 0:
        log.error("event buffer full (%d): %d events dropped so far", BUFFER_MAX, stats.dropped)


@dataclass
class Stats:
    dropped: int = 0
    written: int = 0
    batches: int = 0  # batches committed (written / batches: how well the flush interval groups)
    unknown_tokens: int = 0
    failures: int = 0
    writer_restarts: int = 0  # event writer processes started again after one exited (writer.py)
    #: Opens and clicks written (inferred opens included), by (type, classification): e.g.
    #: ``{("opened", "human"): 3, ("clicked", "machine"): 1}`` (trackrelay_tracker_hits).
    classified: dict[tuple[EventType, Classification], int] = field(default_factory=dict)


OPENED, CLICKED = EventType.OPENED, EventType.CLICKED
_TYPE_CLASS = operator.itemgetter(0, 9)  # an Event's (type, classification)
#: Event(…) of all its fields, without the NamedTuple's Python-level __new__ (~1,000 instructions a hit)
_new_event = functools.partial(tuple.__new__, Event)
assert len(Event._fields) == 18
assert Event._fields[0] == "type" and Event._fields[9] == "classification"


class Recorder:
    def __init__(self, config: Config, sessionmaker: async_sessionmaker, apple: RangeSet,
                 signed_in_ips: "SignedInIps | None" = None, on_written=None, on_flushed=None,
                 key_prefix: str | None = None, position: int = 0):
        self.config = config
        self.sessionmaker = sessionmaker
        self._engine = engine_of(sessionmaker)
        self.apple = apple  # Mail Privacy Protection ranges: they make an open machine, never a click
        self.signed_in = signed_in_ips or SignedInIps()
        self.on_written = on_written
        #: Called after each batch tried, written or not (the writer process reports from it).
        self.on_flushed = on_flushed
        self._buf: deque[Hit] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._recent_clicks: dict[str, dict[int, float]] = {}  # token → link index → last click
        #: (recipient, type) pairs known to have a human event (committed): only ever true, so
        #: safe beside other tracker processes.
        self._human: set[tuple[int, str]] = set()
        #: recipient → when (monotonic) its history was last read from the database: until
        #: HISTORY_TTL later, what ``_human`` lacks of it is known not to exist.
        self._asked: dict[int, float] = {}
        #: (kind, method, user agent, ip) → (request_verdict, stored ip, user agent as kept,
        #: client): what depends on the request alone, worked out once per reader or scanner.
        self._request_facts: dict[tuple[str, str, str, str], tuple] = {}
        #: Idempotency keys: a prefix unique to this process start, then the hit's position in
        #: the stream of hits buffered (``_flushed``: how many have left the buffer, written or
        #: of an unknown token). A batch retried holds the same hits at the same positions, so it gets
        #: the same keys. A writer process is handed both by the serving process, which keeps the
        #: hits until they are written (tracker_http.writer): a new child writes them again under
        #: the same keys.
        self._key_prefix = key_prefix or new_key_prefix()
        self._flushed = position
        self.stats = Stats()

    # -- the hot path ------------------------------------------------------------------------

    def add(self, hit: Hit) -> None:
        buf = self._buf
        if len(buf) >= BUFFER_MAX:
            dropped(self.stats)
            return
        buf.append(hit)
        if len(buf) >= BATCH_MAX:
            self._wake.set()

    def add_many(self, hits: list[Hit]) -> None:
        """``add`` of each hit, in one step while they fit (the writer process's batches)."""
        buf = self._buf
        if len(buf) + len(hits) > BUFFER_MAX:
            for hit in hits:
                self.add(hit)
            return
        buf.extend(hits)
        if len(buf) >= BATCH_MAX:
            self._wake.set()

    @property
    def depth(self) -> int:
        return len(self._buf)

    @property
    def position(self) -> int:
        """How many hits of the stream have left the buffer (written, or of an unknown token)."""
        return self._flushed

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-recorder")

    async def stop(self, grace: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        await finish(self._task, grace)
        self._task = None
        deadline = time.monotonic() + grace
        while self._buf and time.monotonic() < deadline:
            if not await self.flush_once():
                await asyncio.sleep(0.2)
        if self._buf:
            log.error("stopping with %d events not written (database unavailable)", len(self._buf))

    async def _run(self) -> None:
        backoff = 0.5
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), FLUSH_INTERVAL)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            while self._buf and not self._stopping:
                if not await self.flush_once():
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    break
                backoff = 0.5
                if len(self._buf) < BATCH_MAX:
                    break  # what came in meanwhile waits for the next interval: a batch, not a trickle
            if len(self._buf) < BATCH_MAX:
                # Set while a batch was written, for hits that have left with a full batch since:
                # kept, it would send the remainder at once, a small batch back to back.
                self._wake.clear()

    async def flush_once(self) -> bool:
        """Write one batch from the front of the buffer; False (batch kept) when that failed."""
        batch = list(itertools.islice(self._buf, BATCH_MAX))
        if not batch:
            return True
        try:
            written = await self._write(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.stats.failures += 1
            if self.stats.failures in (1, 10) or self.stats.failures % 100 == 0:
                log.warning("writing %d events failed (%s); kept for retry", len(batch), type(exc).__name__)
            if self.on_flushed:
                self.on_flushed()
            return False
        if len(batch) == len(self._buf):
            self._buf.clear()
        else:
            for _ in batch:
                self._buf.popleft()
        self._flushed += len(batch)
        self.stats.written += written
        self.stats.batches += 1
        if written and self.on_written:
            self.on_written()
        if self.on_flushed:
            self.on_flushed()
        return True

    # -- the batch ---------------------------------------------------------------------------

    async def _write(self, batch: list[Hit]) -> int:
        async with ev.hits(self._engine) as hits:
            info, history, unknown = await hits.facts({h[1] for h in batch}, self._known_history)
            asked = dict.fromkeys(unknown, time.monotonic())
            events, dates = self._events(batch, info, history)
            await hits.write(events, dates)
        # The batch is committed: its events count, by (type, classification).
        counts = self.stats.classified
        for key, n in Counter(map(_TYPE_CLASS, events)).items():
            counts[key] = counts.get(key, 0) + n
        if len(self._human) > HUMAN_CACHE_MAX or len(self._asked) > HUMAN_CACHE_MAX:
            self._human.clear()
            self._asked.clear()
        self._human |= history  # committed now
        self._asked.update(asked)
        return len(events)

    def _events(self, batch: list[Hit], info: dict[str, ev.TokenInfo], history: set[tuple[int, str]]
                ) -> tuple[list[Event], dict[str, dict[str, float]]]:
        """Classify the batch: its events (inferred opens and ``first`` by
        ``core.events.human_sequence``) and the contact dates its human events move (epoch seconds,
        by lower-cased address). ``history`` gains the batch's human pairs."""
        window = self.config.tracking.scanner_window_seconds
        recent_sign_in, burst, request_facts = self.signed_in.recent, self._burst, self._request_facts
        key_prefix, base = self._key_prefix, KEY_BASE + self._flushed
        events: list[Event] = []
        #: the latest human open and click by lower-cased address (the contact's dates)
        latest: dict[EventType, dict[str, float]] = {OPENED: {}, CLICKED: {}}
        #: token → (delivered, accepted) in epoch seconds, and the address whose contact moves
        #: (None: a Never Log recipient's contact is never touched)
        copies: dict[str, tuple[float, float, str | None]] = {}
        for i, (kind, token, method, ip, ua, at, url, link_index) in enumerate(batch):
            t = info.get(token)
            if t is None:
                self.stats.unknown_tokens += 1
                continue
            times = copies.get(token)
            if times is None:
                accepted = t.accepted_at.timestamp()
                times = copies[token] = (t.sent_at.timestamp() if t.sent_at else accepted, accepted,
                                         None if t.never_log else t.address.lower())
            request = request_facts.get((kind, method, ua, ip))
            if request is None:
                request = self._request(kind, method, ua, ip)
            # a click's time is remembered for bursts whatever its verdict (scanners click them all)
            clicked_with_others = kind == "click" and burst(token, link_index, at)
            cls, reason = request[0] or timing_verdict(kind, ip, at, times[0], t.client_ip, times[1],
                                                       clicked_with_others, recent_sign_in(ip, at), window)
            etype = OPENED if kind == "open" else CLICKED
            event = _new_event((etype, t.message_pk, at, t.recipient_pk, t.user, url, request[1], request[2],
                                request[3], cls, reason, False, False, key_prefix + str(base + i), None, None,
                                None, None))
            if cls == HUMAN:
                events += human_sequence(event, history)
                address = times[2]
                if address is not None:
                    moved = latest[etype]
                    if moved.get(address, 0.0) < at:
                        moved[address] = at
            else:
                events.append(event)
        return events, _contact_dates(latest[OPENED], latest[CLICKED])

    def _request(self, kind: str, method: str, ua: str, ip: str) -> tuple:
        """What a request's event owes to the request alone: (request_verdict, stored ip, user agent
        as kept, client), remembered for the reader's or scanner's next request."""
        ua_kept = ua[:1000]
        found = (request_verdict(kind, method, ua_kept, kind == "open" and ip in self.apple),
                 stored_ip(ip, self.config.privacy.store_ip), ua_kept, client_of(ua_kept))
        facts = self._request_facts
        if len(facts) >= REQUEST_CACHE_MAX:
            facts.clear()
        if len(ua) <= 1000:  # a few MB at most
            facts[(kind, method, ua, ip)] = found
        return found

    def _known_history(self, recipient_pks: set[int]) -> tuple[set[tuple[int, str]], set[int]]:
        """The history memory holds in full — both kinds known human, or the database asked within
        HISTORY_TTL (and this process's writes since added) — and the recipients to ask about.
        What is asked counts only once its batch is committed (``_write``): a batch that failed
        leaves memory as it was."""
        known, asked, fresh = self._human, self._asked, time.monotonic() - HISTORY_TTL
        unknown = {pk for pk in recipient_pks
                   if ((pk, OPENED) not in known or (pk, CLICKED) not in known)
                   and asked.get(pk, fresh) <= fresh}
        history = {(pk, k) for pk in recipient_pks - unknown for k in (OPENED, CLICKED) if (pk, k) in known}
        return history, unknown

    def _burst(self, token: str, link_index: int | None, at: float) -> bool:
        """Another link of the same copy clicked within BURST_SECONDS (scanners click them all)."""
        last = self._recent_clicks.get(token)
        if last is None:
            if len(self._recent_clicks) > 10_000:  # forget the oldest copies
                for k in list(self._recent_clicks)[:5000]:
                    del self._recent_clicks[k]
            last = self._recent_clicks[token] = {}
        index = link_index if link_index is not None else -1
        burst = any(i != index and at - t < BURST_SECONDS for i, t in last.items())
        last[index] = at  # per link of the copy, its latest click
        return burst


def _contact_dates(opens: dict[str, float], clicks: dict[str, float]) -> dict[str, dict[str, float]]:
    """The latest human open and click by address as the contact dates they move: last_open_at,
    last_click_at, and last_engagement_at the later of the two."""
    dates: dict[str, dict[str, float]] = {}
    for address, at in opens.items():
        dates[address] = {"last_open_at": at, "last_engagement_at": at}
    for address, at in clicks.items():
        moved = dates.get(address)
        if moved is None:
            dates[address] = {"last_click_at": at, "last_engagement_at": at}
        else:
            moved["last_click_at"] = at
            if moved["last_engagement_at"] < at:
                moved["last_engagement_at"] = at
    return dates


class SignedInIps:
    """Addresses from which team members used the API or pages recently (the `self` heuristic)."""

    def __init__(self, window_seconds: float = 86400):
        self._seen: dict[str, float] = {}
        self._window = window_seconds

    def saw(self, ip: str) -> None:
        self._seen[ip] = time.time()

    def recent(self, ip: str, at: float) -> bool:
        t = self._seen.get(ip)
        return t is not None and at - t < self._window

    def seen_since(self, t: float) -> dict[str, float]:
        """The addresses seen at or after ``t`` (epoch seconds), with when: for a writer process."""
        return {ip: at for ip, at in self._seen.items() if at >= t}

    def merge(self, seen: dict[str, float]) -> None:
        for ip, at in seen.items():
            if self._seen.get(ip, 0.0) < at:
                self._seen[ip] = at
