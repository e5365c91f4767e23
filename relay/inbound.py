"""The inbound listener (``relay.inbound_listen``): forwarded and BCC'd incoming mail and bounces.

It accepts mail only for ``log+<log_key>@<relay.hostname>`` (no AUTH; any other recipient gets
``550 5.7.1``; nothing is ever relayed; lines up to ``INBOUND_LINE_LIMIT``, since some providers'
bounces exceed RFC 5321's 1,000 octets). Before the 250, in one transaction:

- a bounce (``relay.bounces``: DSNs and the non-standard notices) about one of our messages records
  ``bounced`` (permanent) or ``deferred`` (temporary) for each failed recipient, with the format,
  status code and diagnostic as the event's reason; it is never logged as incoming mail;
- other mail is logged to its sender's contact — created unless the sender is ``MAILER-DAEMON``,
  ``postmaster`` or the null sender ``<>``;
- a reply to one of our messages records ``replied`` (and an inferred open when no human open came
  first) unless it is automatic (``relay.autoreply``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import weakref
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from relay import autoreply, bounces
from relay import message as m
from relay import replies
from relay.crm import ParsedEmail, addresses, parse_email, write_logged_email
from relay.smtp import CALL_LIMITS, RelaySMTP, SessionTracking
from storage import crm as q
from storage import events as ev
from storage.models import Message, Recipient, utcnow
from trackrelay import mailaddr
from trackrelay.config import Config, User, parse_hostport
from trackrelay.neverlog import matches, normalise_entry

log = logging.getLogger("trackrelay.inbound")

#: Longest line accepted (with its CRLF): bounces from some providers carry whole HTML pages or
#: header blocks on one line.
INBOUND_LINE_LIMIT = 1 << 20
#: A bounce that names no Message-ID of the original is matched to the addressed user's latest
#: message to that recipient within this time.
BOUNCE_WITHOUT_ID_WINDOW = timedelta(days=7)


def automatic_reason(p: ParsedEmail) -> str | None:
    """Why this incoming mail is an automatic reply (``relay.autoreply``), or None."""
    return autoreply.detect({**p.headers, "subject": p.subject})


def _id_forms(ids) -> list[str]:
    """Message-IDs as a stored Message-ID may be written: with angle brackets and without."""
    out: list[str] = []
    for i in ids:
        bare = i.strip().strip("<>").strip()
        if bare:
            out += [f"<{bare}>", bare]
    return list(dict.fromkeys(out))


class InboundHandler(SessionTracking):
    def __init__(self, config: Config, sessionmaker: async_sessionmaker, on_events=None):
        self.config = config
        self.on_events = on_events or (lambda: None)
        self.sessionmaker = sessionmaker
        self.users = {u.log_key: u for u in config.users if u.log_key}
        self.team_cfg = tuple(normalise_entry(e) for e in config.never_log.team)
        self.sessions: weakref.WeakSet = weakref.WeakSet()

    def _user_for(self, address: str) -> User | None:
        local, _, domain = address.rpartition("@")
        if domain.lower() != self.config.relay.hostname.lower() or not local.lower().startswith("log+"):
            return None
        return self.users.get(local[4:])

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self._user_for(address) is None:
            return replies.INBOUND_ONLY
        envelope.rcpt_tos.append(address)
        return replies.OK_RECIPIENT

    async def handle_DATA(self, server, session, envelope):
        raw = m.normalize_crlf(envelope.original_content or b"")
        users = list({u.name: u for u in (self._user_for(r) for r in envelope.rcpt_tos) if u}.values())
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
        # Bounce senders and the null sender (auto-replies) never become contacts; an existing
        # contact still gets the mail on its timeline.
        create = False if mailaddr.is_system(sender) or (mail_from is not None and mailaddr.is_system(mail_from)) else None
        internal = sender in self.config.user_addresses or \
            sender.rpartition("@")[2] in self.config.internal_domains
        team_addresses = {a.lower() for a in self.config.crm.team_addresses}
        never = False
        for user in users:
            lists = await q.never_log_lists(s, user.name, self.team_cfg,
                                            tuple(normalise_entry(e) for e in user.never_log))
            user_never = sender not in team_addresses and (
                matches(sender, lists.team) or matches(sender, lists.personal))
            never = never or user_never
            if not internal and not user_never:
                await write_logged_email(s, self.config, parsed, direction="incoming", user=user.name,
                                         message_pk=None, contact_emails=[sender], owner=user.name,
                                         create_contacts=create)
        why = automatic_reason(parsed)
        if why is None and not mailaddr.is_system(sender):
            await self._replied(s, parsed, sender, never)
        elif why is not None:
            log.info("inbound automatic reply, no replied event: %s", why)

    async def _our_recipients(self, s: AsyncSession, ids: list[str], address: str | None):
        if not ids:
            return []
        q_ = (select(Recipient, Message.user).join(Message, Message.id == Recipient.message_pk)
              .where(Message.message_id.in_(_id_forms(ids)), Message.kind == "mail"))
        if address is not None:
            q_ = q_.where(func.lower(Recipient.address).in_(sorted(mailaddr.variants(address))))
        return (await s.execute(q_)).all()

    async def _latest_to(self, s: AsyncSession, addresses_: set[str], users: list[User]):
        """The addressed users' latest message to one of these addresses, within the window."""
        if not users:
            return []
        row = (await s.execute(
            select(Recipient, Message.user).join(Message, Message.id == Recipient.message_pk)
            .where(func.lower(Recipient.address).in_(sorted(addresses_)), Message.kind == "mail",
                   Message.user.in_([u.name for u in users]),
                   Message.accepted_at >= utcnow() - BOUNCE_WITHOUT_ID_WINDOW)
            .order_by(Message.accepted_at.desc(), Recipient.id.desc()).limit(1))).first()
        return [row] if row else []

    async def _replied(self, s: AsyncSession, parsed: ParsedEmail, sender: str, never: bool) -> None:
        refs = ([parsed.in_reply_to] if parsed.in_reply_to else []) + parsed.references
        rows = await self._our_recipients(s, refs, sender)
        if not rows:
            return
        now = utcnow()
        history = await ev.human_history(s, {r.id for r, _ in rows})
        events = []
        for r, user in rows:
            key = f"reply:{parsed.message_id or id(parsed)}:{r.id}"
            if (r.id, "opened") not in history:
                events.append(dict(type="opened", at=now, message_pk=r.message_pk, recipient_pk=r.id, user=user,
                                   classification="human", reason="inferred_from_reply", first=True,
                                   inferred=True, dedupe_key=key + ":open"))
            events.append(dict(type="replied", at=now, message_pk=r.message_pk, recipient_pk=r.id, user=user,
                               classification="human", reason=None, first=(r.id, "replied") not in history,
                               inferred=False, dedupe_key=key))
        await ev.insert_idempotent(s, events)
        if not never and not any(r.never_log for r, _ in rows):
            await q.touch_contacts(s, {sender: {"last_engagement_at": now}})

    async def _bounced(self, s: AsyncSession, bounce: bounces.Bounce, users: list[User], raw: bytes) -> None:
        """``bounced`` (permanent) or ``deferred`` (temporary) for each of our recipients the bounce
        names: by the original's Message-ID, or — when the bounce names none — the addressed user's
        latest message to that address."""
        now = utcnow()
        events = []
        notice = hashlib.sha256(raw).hexdigest()[:24]
        seen: set[int] = set()
        ours = await self._our_recipients(s, list(bounce.message_ids), None) if bounce.failures else []
        for f in bounce.failures:
            forms = set().union(*(mailaddr.variants(a) for a in f.addresses))
            if bounce.message_ids:
                rows = [(r, u) for r, u in ours if r.address.lower() in forms]
            else:
                rows = await self._latest_to(s, forms, users)
            reason = f"{bounce.format}; status {f.status or 'unknown'}; {f.diagnostic or 'no diagnostic'}"[:1000]
            for r, user in rows:
                if r.id in seen:
                    continue
                seen.add(r.id)
                kind = "bounced" if f.permanent else "deferred"
                events.append(dict(type=kind, at=now, message_pk=r.message_pk, recipient_pk=r.id, user=user,
                                   classification=None, reason=reason, first=False, inferred=False,
                                   dedupe_key=f"dsn:{r.id}" if f.permanent else f"dsn-delay:{r.id}:{notice}"))
                if f.permanent:
                    await s.execute(update(Recipient).where(Recipient.id == r.id).values(status="bounced")
                                    .execution_options(synchronize_session=False))
        await ev.insert_idempotent(s, events)
        log.info("inbound bounce (%s): %d failures read, %d recipients of ours", bounce.format,
                 len(bounce.failures), len(events))


async def start_inbound(config: Config, handler: InboundHandler) -> asyncio.base_events.Server:
    host, port = parse_hostport(config.relay.inbound_listen or "")

    def factory() -> RelaySMTP:
        proto = RelaySMTP(handler, hostname=config.relay.hostname, ident="trackrelay", decode_data=False,
                          data_size_limit=config.relay.max_message_bytes, enable_SMTPUTF8=True,
                          timeout=300, auth_required=False, command_call_limit=CALL_LIMITS)
        proto.line_length_limit = INBOUND_LINE_LIMIT
        handler.sessions.add(proto)
        return proto

    return await asyncio.get_running_loop().create_server(factory, host, port)
