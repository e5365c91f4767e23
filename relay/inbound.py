"""The inbound listener (``relay.inbound_listen``): forwarded and BCC'd incoming mail and bounces.

It accepts mail only for ``log+<log_key>@<relay.hostname>`` (no AUTH; any other recipient gets
``550 5.7.1``; nothing is ever relayed; lines up to ``INBOUND_LINE_LIMIT``, since some providers'
bounces exceed RFC 5321's 1,000 octets). Log keys are guessable only by trying them, so unknown
recipients are budgeted: ``UNKNOWN_PER_CONNECTION`` (3) per connection and
``UNKNOWN_PER_CLIENT`` (5) per client address (IPv6: its /64) in ``UNKNOWN_WINDOW_SECONDS`` (60);
past either, ``421 4.7.0`` and the connection is closed, and a client over its budget gets ``421``
for every recipient — a right key included — until its window has room again.

Whoever knows a log key can send anything to it, so mail changes state only for messages of the
user whose log address received it (several addressed: theirs), and only with proof that it
refers to our mail. Before the 250, in one transaction:

- a bounce (``relay.bounces``: DSNs and the non-standard notices) records ``bounced`` (permanent)
  or ``deferred`` (temporary) for each failed recipient it proves to be about one of that user's
  copies: by our signed per-copy reference (``X-Trackrelay-Ref``, ``relay.reference``) in the
  returned original, or by the original Message-ID of one of that user's messages to that address.
  Format, status code, diagnostic and the proof are the event's reason. A bounce that proves
  nothing records nothing; a bounce is never logged as incoming mail;
- other mail is logged to its sender's contact — created unless the sender is ``MAILER-DAEMON``,
  ``postmaster`` or the null sender ``<>`` — with what proved it (``storage.inbound_proof``:
  ``reply``, ``thread``, ``ref`` or ``none``), unless the sender is internal or on the user's Never
  Log lists: the relay's own rules decide (``relay.policy.INBOUND_RULES``) and their reasons are
  logged;
- a reply records ``replied`` (and an inferred open when no human open came first) only when its
  In-Reply-To/References name one of that user's messages and its sender was a recipient of it;
  an automatic one (``relay.autoreply``: out-of-office, autoresponder, read receipt) with the same
  proof records ``replied`` classified ``machine``, reason ``auto_reply:<what was recognised>``
  (``auto_reply:header Auto-Submitted: auto-replied``, ``auto_reply:subject: out of office``):
  no inferred open, no engagement date moved, not counted as engagement anywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import time
import weakref
from collections import OrderedDict, deque

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from relay import autoreply, bounces
from relay import message as m
from relay import policy, reference, replies
from relay.crm import ParsedEmail, addresses, parse_email, write_logged_email
from relay.protocol import SessionTracking, protocol_factory
from storage import crm as q
from storage import events as ev
from storage import inbound as copies
from storage import inbound_proof
from storage.inbound import Copy
from storage.models import utcnow
from core import mailaddr
from core.config import Config, User, parse_hostport
from core.events import Classification, Event, EventType, human_sequence
from core.links import Keyring, key_file_path
from core.neverlog import normalise_entry

log = logging.getLogger("trackrelay.inbound")

#: Longest line accepted (with its CRLF): bounces from some providers carry whole HTML pages or
#: header blocks on one line.
INBOUND_LINE_LIMIT = 1 << 20
#: Unknown recipients (wrong log keys, other addresses) answered 550 on one connection; the next
#: gets 421 and the connection is closed.
UNKNOWN_PER_CONNECTION = 3
#: Unknown recipients per client address (IPv6: per /64) in UNKNOWN_WINDOW_SECONDS; past them,
#: every recipient from that client gets 421 until the window has room.
UNKNOWN_PER_CLIENT = 5
UNKNOWN_WINDOW_SECONDS = 60.0
#: Clients whose unknown recipients are remembered (least recently seen forgotten first).
UNKNOWN_CLIENTS_TRACKED = 4096
TOO_MANY_UNKNOWN = "421 4.7.0 Too many unknown recipients, try again later"


def automatic_reason(p: ParsedEmail) -> str | None:
    """Why this incoming mail is an automatic reply (``relay.autoreply``), or None."""
    return autoreply.detect({**p.headers, "subject": p.subject})


def client_key(peer) -> str:
    """The client a budget is kept for: its IPv4 address, or its IPv6 /64."""
    host = peer[0] if isinstance(peer, tuple) and peer else str(peer)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class UnknownBudget:
    """Unknown recipients per client in a sliding window, LRU-bounded (distinct clients cannot grow
    memory past ``UNKNOWN_CLIENTS_TRACKED`` entries of at most ``limit`` times each)."""

    def __init__(self, limit: int = UNKNOWN_PER_CLIENT, window: float = UNKNOWN_WINDOW_SECONDS,
                 size: int = UNKNOWN_CLIENTS_TRACKED, clock=time.monotonic):
        self.limit, self.window, self.size, self.clock = limit, window, size, clock
        self._seen: OrderedDict[str, deque] = OrderedDict()

    def _times(self, client: str) -> deque | None:
        times = self._seen.get(client)
        if times is None:
            return None
        cutoff = self.clock() - self.window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._seen[client]
            return None
        return times

    def spent(self, client: str) -> bool:
        times = self._times(client)
        return times is not None and len(times) >= self.limit

    def charge(self, client: str) -> None:
        times = self._times(client)
        if times is None:
            times = self._seen[client] = deque(maxlen=self.limit)
        times.append(self.clock())
        self._seen.move_to_end(client)
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)


def _key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def inbound_keyring(config: Config) -> Keyring | None:
    """The keyring that signed our copies' references: ``tracker.secret_keys``, else the key a
    single ``serve`` generated beside its database; None when neither exists (then only the
    Message-ID can prove a bounce)."""
    if config.tracker.secret_keys:
        return Keyring.from_strings(config.tracker.secret_keys)
    try:
        key = key_file_path(config.storage.url).read_text().strip()
    except OSError:
        return None
    return Keyring.from_strings([key]) if key else None


class InboundHandler(SessionTracking):
    def __init__(self, config: Config, sessionmaker: async_sessionmaker, on_events=None,
                 keyring: Keyring | None = None):
        self.sessionmaker = sessionmaker
        self.on_events = on_events or (lambda: None)
        self.sessions: weakref.WeakSet = weakref.WeakSet()
        self.budget = UnknownBudget()
        self._unknown: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # session -> count
        self._keyring = keyring
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """SIGHUP: new users and log keys take effect for the next RCPT."""
        self.config = config
        #: By the key's SHA-256: a look-up costs the same whatever the guess shares with a key.
        self.users = {_key_digest(u.log_key): u for u in config.users if u.log_key}
        self.team_cfg = tuple(normalise_entry(e) for e in config.never_log.team)
        self.team_addresses = frozenset(a.lower() for a in config.crm.team_addresses)
        self.keyring = self._keyring or inbound_keyring(config)

    def _user_for(self, address: str) -> User | None:
        local, _, domain = address.rpartition("@")
        if domain.lower() != self.config.relay.hostname.lower() or not local.lower().startswith("log+"):
            return None
        return self.users.get(_key_digest(local[4:]))

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        client = client_key(session.peer)
        if self.budget.spent(client):
            log.warning("inbound: client over its unknown-recipient budget, answered 421")
            return TOO_MANY_UNKNOWN
        if self._user_for(address) is None:
            count = self._unknown.get(session, 0) + 1
            self._unknown[session] = count
            if count > UNKNOWN_PER_CONNECTION:
                log.warning("inbound: %d unknown recipients on one connection, answered 421", count)
                return TOO_MANY_UNKNOWN
            self.budget.charge(client)
            return replies.INBOUND_ONLY
        envelope.rcpt_tos.append(address)
        return replies.OK_RECIPIENT

    async def handle_DATA(self, server, session, envelope):
        raw = m.normalize_crlf(envelope.original_content or b"")
        users = list({u.name: u for u in (self._user_for(r) for r in envelope.rcpt_tos) if u}.values())
        if not users:  # the key was removed (SIGHUP) between RCPT and DATA
            return replies.NO_RECIPIENTS
        try:
            async with self.sessionmaker() as s:
                async with s.begin():
                    await self.process(s, raw, users, envelope.mail_from)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("inbound processing failed, answered 451: %s", type(exc).__name__)
            return replies.TEMP_FAILURE
        self.on_events()
        return replies.OK

    async def handle_exception(self, error: Exception) -> str:
        log.error("inbound session error: %s", type(error).__name__)
        return replies.TEMP_FAILURE

    async def process(self, s: AsyncSession, raw: bytes, users: list[User], mail_from: str | None = None) -> None:
        bounce = await asyncio.to_thread(bounces.parse, raw, mail_from)  # CPU work, off the event loop
        if bounce is not None:
            await self._bounced(s, bounce, users, raw)
            return
        parsed = parse_email(raw)
        senders = addresses(parsed.from_)
        if not senders:
            return
        sender = senders[0]
        names = [u.name for u in users]
        cited = await copies.copies_of_messages(s, self._cited_ids(parsed), names)
        sender_forms = mailaddr.variants(sender)
        replied_to = [c for c in cited if c.address.lower() in sender_forms]
        by_ref = await copies.copies_by_id(s, reference.verified(self.keyring, [raw]) if self.keyring else set(), names)
        never = False
        for user in users:
            lists = await q.never_log_lists(s, user.name, self.team_cfg,
                                            tuple(normalise_entry(e) for e in user.never_log))
            d = self.decide(sender, mail_from, lists)
            never = never or d.never_log
            logged = None
            if d.log:
                logged = await write_logged_email(s, self.config, parsed, direction="incoming", user=user.name,
                                                  message_pk=None, contact_emails=[sender], owner=user.name,
                                                  create_contacts=d.create_contacts)
                if logged is not None:
                    proof, message_pk = _proof_for(user.name, replied_to, cited, by_ref)
                    await inbound_proof.record(s, logged.id, proof, message_pk)
            log.info("inbound mail for %s: %s (%s)", user.name, "logged" if logged is not None else "not logged",
                     ", ".join(d.reasons))
        why = automatic_reason(parsed)
        if not mailaddr.is_system(sender):
            await self._replied(s, parsed, sender, never, replied_to, why)
            if why is not None:
                log.info("inbound automatic reply (%s): a machine replied for %d proven copies", why, len(replied_to))

    def decide(self, sender: str, mail_from: str | None, lists: q.NeverLogLists) -> policy.Decision:
        """Whether mail from ``sender`` to a user's log address is logged, and a contact created
        for it (``relay.policy.INBOUND_RULES``, with that user's Never Log lists). Bounce senders
        and the null sender (auto-replies) never become contacts; an existing contact still gets
        the mail on its timeline."""
        facts = policy.MessageFacts(
            user_addresses=self.config.user_addresses, internal_domains=self.config.internal_domains,
            x_track=None, x_log=None, log_bcc=True, sender=sender, never_log_team=lists.team,
            never_log_personal=lists.personal, team_addresses=self.team_addresses,
            system_sender=mailaddr.is_system(sender) or (mail_from is not None and mailaddr.is_system(mail_from)))
        return policy.decide(self.config, facts, sender, policy.INBOUND_RULES)

    @staticmethod
    def _cited_ids(parsed: ParsedEmail) -> list[str]:
        return ([parsed.in_reply_to] if parsed.in_reply_to else []) + parsed.references

    async def _replied(self, s: AsyncSession, parsed: ParsedEmail, sender: str, never: bool,
                       rows: list[Copy], automatic: str | None = None) -> None:
        """``replied`` for the copies the reply proved to answer (its In-Reply-To/References name
        the message, its sender was the copy's recipient, the message is the addressed user's),
        with an inferred open before it when no human open came first (``human_sequence``).

        An automatic reply (``automatic``: what ``relay.autoreply.detect`` recognised) proves the
        same but is no engagement: a ``replied`` classified machine with reason
        ``auto_reply:<why>``, no inferred open, ``first`` unset, no contact date moved."""
        if not rows:
            return
        now = utcnow()
        if automatic is not None:
            reason = f"auto_reply:{automatic}"[:1000]
            await ev.write_events(s, [Event(
                type=EventType.REPLIED, at=now, message_pk=c.message_pk, recipient_pk=c.id, user=c.user,
                classification=Classification.MACHINE, reason=reason,
                dedupe_key=f"reply:{parsed.message_id or id(parsed)}:{c.id}") for c in rows])
            return
        history = await ev.human_history(s, {c.id for c in rows})
        events: list[Event] = []
        for c in rows:
            events += human_sequence(Event(
                type=EventType.REPLIED, at=now, message_pk=c.message_pk, recipient_pk=c.id, user=c.user,
                classification=Classification.HUMAN,
                dedupe_key=f"reply:{parsed.message_id or id(parsed)}:{c.id}"), history)
        await ev.write_events(s, events)
        if not never and not any(c.never_log for c in rows):
            await q.touch_contacts(s, {sender: {"last_engagement_at": now}})

    async def _bounced(self, s: AsyncSession, bounce: bounces.Bounce, users: list[User], raw: bytes) -> None:
        """``bounced`` (permanent) or ``deferred`` (temporary) for each of the addressed users'
        copies the bounce proves: our signed reference in the returned original names the copy, or
        the original's Message-ID names one of their messages and the failure its recipient. One
        failure whose address is not the copy's (an alias the copy was forwarded to) with exactly
        one proven copy is that copy's. Nothing else is matched: no proof, no event."""
        if not bounce.failures:
            log.info("inbound bounce (%s) names no failed recipient: nothing recorded", bounce.format)
            return
        ref_ids = reference.verified(self.keyring, bounce.refs) if self.keyring and bounce.refs else set()
        names = [u.name for u in users]
        by_ref = await copies.copies_by_id(s, ref_ids, names)
        by_id = await copies.copies_of_messages(s, list(bounce.message_ids), names)
        now = utcnow()
        notice = hashlib.sha256(raw).hexdigest()[:24]
        events: list[Event] = []
        failed: list[int] = []
        seen: set[int] = set()
        for f in bounce.failures:
            forms = set().union(*(mailaddr.variants(a) for a in f.addresses))
            rows = [(c, "reference") for c in by_ref if c.address.lower() in forms] + \
                   [(c, "message-id") for c in by_id if c.address.lower() in forms]
            if not rows and len(bounce.failures) == 1 and len(by_ref) == 1:
                rows = [(by_ref[0], "reference")]
            diagnostic = f.diagnostic or "no diagnostic"
            for c, proof in rows:
                if c.id in seen:
                    continue
                seen.add(c.id)
                reason = f"{bounce.format}; status {f.status or 'unknown'}; proof {proof}; {diagnostic}"[:1000]
                events.append(Event(
                    type=EventType.BOUNCED if f.permanent else EventType.DEFERRED, at=now, message_pk=c.message_pk,
                    recipient_pk=c.id, user=c.user, reason=reason,
                    dedupe_key=f"dsn:{c.id}" if f.permanent else f"dsn-delay:{c.id}:{notice}"))
                if f.permanent:
                    failed.append(c.id)
        await copies.mark_bounced(s, failed)
        await ev.write_events(s, events)
        log.info("inbound bounce (%s): %d failures read, %d copies proven (%d by reference), %s",
                 bounce.format, len(bounce.failures), len(events), len(by_ref),
                 "recorded" if events else "no proof: nothing recorded")


def _proof_for(user: str, replied_to: list[Copy], cited: list[Copy], by_ref: list[Copy]) -> tuple[str, int | None]:
    """What ties an incoming email to this user's mail (``storage.inbound_proof``)."""
    for kind, rows in (("reply", replied_to), ("thread", cited), ("ref", by_ref)):
        for c in rows:
            if c.user == user:
                return kind, c.message_pk
    return "none", None


async def start_inbound(config: Config, handler: InboundHandler) -> asyncio.base_events.Server:
    host, port = parse_hostport(config.relay.inbound_listen or "")

    factory = protocol_factory(handler, hostname=config.relay.hostname,
                               data_size_limit=config.relay.max_message_bytes, auth_required=False,
                               line_length_limit=INBOUND_LINE_LIMIT)
    return await asyncio.get_running_loop().create_server(factory, host, port)
