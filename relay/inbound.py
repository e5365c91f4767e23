"""The inbound listener (``relay.inbound_listen``): forwarded and BCC'd incoming mail and DSNs.

It accepts mail only for ``log+<log_key>@<relay.hostname>`` (no AUTH; any other recipient gets
``550 5.7.1``; nothing is ever relayed). Before the 250, in one transaction: an incoming message is
logged to its sender's contact; a reply to one of our messages records ``replied`` (and an inferred
open when no human open came first) unless it is automatic; a DSN about one of our messages
records ``bounced`` for the recipients it names.
"""

from __future__ import annotations

import asyncio
import email
import logging
import re
import weakref
from email import policy as email_policy

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from relay import message as m
from relay import replies
from relay.crm import ParsedEmail, addresses, parse_email, write_logged_email
from relay.smtp import CALL_LIMITS, RelaySMTP, SessionTracking
from storage import crm as q
from storage import events as ev
from storage.models import Message, Recipient, utcnow
from trackrelay.config import Config, User, parse_hostport
from trackrelay.neverlog import matches, normalise_entry

log = logging.getLogger("trackrelay.inbound")

_AUTO_SUBJECT = re.compile(r"^\s*(automatic reply|auto(matic)?[- ]?reply|out of (the )?office|autoreply|"
                           r"abwesenheitsnotiz|automatyczna odpowied[zź]|r[ée]ponse automatique)", re.I)


def is_automatic(p: ParsedEmail) -> bool:
    """Auto-Submitted other than no, autoresponder headers, out-of-office subjects."""
    auto = p.headers.get("auto-submitted", "").strip().lower()
    if auto and auto != "no":
        return True
    if p.headers.get("x-autoreply") or p.headers.get("x-autorespond"):
        return True
    if p.headers.get("precedence", "").strip().lower() in ("auto_reply", "bulk", "junk"):
        return True
    return bool(_AUTO_SUBJECT.match(p.subject or ""))


def dsn_failures(raw: bytes) -> tuple[list[str], list[str]] | None:
    """(failed recipients, Message-IDs of the original) of a delivery-status report, else None."""
    msg = email.message_from_bytes(raw, policy=email_policy.compat32)
    if msg.get_content_type() != "multipart/report" or \
            (msg.get_param("report-type") or "").lower() != "delivery-status":
        return None
    failed, ids = [], []
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/delivery-status":
            for block in part.get_payload():
                action = (block.get("Action") or "").strip().lower()
                final = block.get("Final-Recipient") or block.get("Original-Recipient") or ""
                addr = final.split(";", 1)[-1].strip().strip("<>").lower()
                if action == "failed" and "@" in addr:
                    failed.append(addr)
        elif ctype in ("text/rfc822-headers", "message/rfc822"):
            payload = part.get_payload()
            text = payload if isinstance(payload, str) else "".join(str(p) for p in payload)
            found = re.search(r"^Message-ID:\s*(<[^>\s]+>)", text, re.I | re.M)
            if found:
                ids.append(found.group(1))
    for header in ("In-Reply-To", "References"):
        ids += re.findall(r"<[^<>\s]+>", msg.get(header, ""))
    return failed, ids


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
                    await self.process(s, raw, users)
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

    async def process(self, s: AsyncSession, raw: bytes, users: list[User]) -> None:
        dsn = dsn_failures(raw)
        if dsn is not None:
            await self._bounced(s, *dsn)
            return
        parsed = parse_email(raw)
        senders = addresses(parsed.from_)
        if not senders:
            return
        sender = senders[0]
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
                                         message_pk=None, contact_emails=[sender], owner=user.name)
        if not is_automatic(parsed):
            await self._replied(s, parsed, sender, never)

    async def _our_recipients(self, s: AsyncSession, ids: list[str], address: str | None):
        if not ids:
            return []
        q_ = (select(Recipient, Message.user).join(Message, Message.id == Recipient.message_pk)
              .where(Message.message_id.in_(ids), Message.kind == "mail"))
        if address is not None:
            q_ = q_.where(func.lower(Recipient.address) == address)
        return (await s.execute(q_)).all()

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

    async def _bounced(self, s: AsyncSession, failed: list[str], ids: list[str]) -> None:
        now = utcnow()
        events = []
        for address in dict.fromkeys(failed):
            for r, user in await self._our_recipients(s, ids, address):
                events.append(dict(type="bounced", at=now, message_pk=r.message_pk, recipient_pk=r.id, user=user,
                                   classification=None, reason="DSN received", first=False, inferred=False,
                                   dedupe_key=f"dsn:{r.id}"))
                await s.execute(update(Recipient).where(Recipient.id == r.id).values(status="bounced")
                                .execution_options(synchronize_session=False))
        await ev.insert_idempotent(s, events)


async def start_inbound(config: Config, handler: InboundHandler) -> asyncio.base_events.Server:
    host, port = parse_hostport(config.relay.inbound_listen or "")

    def factory() -> RelaySMTP:
        proto = RelaySMTP(handler, hostname=config.relay.hostname, ident="trackrelay", decode_data=False,
                          data_size_limit=config.relay.max_message_bytes, enable_SMTPUTF8=True,
                          timeout=300, auth_required=False, command_call_limit=CALL_LIMITS)
        handler.sessions.add(proto)
        return proto

    return await asyncio.get_running_loop().create_server(factory, host, port)
