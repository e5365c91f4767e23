"""The submission listener: a thin aiosmtpd edge that authenticates, refuses what is wrong, decides
per recipient, spools durably and only then answers 250.

The protocol (``relay.protocol.RelaySMTP``) and its factory are shared with the inbound listener;
what DATA answers is decided step by step by the pure ``relay.acceptance``; this module holds the
handler hooks, the one awaited step (the spool commit) and the listener's start.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from datetime import datetime
from typing import Awaitable, Callable, Protocol

from aiosmtpd.smtp import SMTP

from relay import acceptance, maillog
from relay import replies
from relay.auth import Authenticator
from relay.policy import ContactFacts
from core.batcher import Batcher
from storage.spool import SpoolEntry
from core.config import Config
from relay.acceptance import canonical, recipient_problem
from relay.protocol import RelaySMTP, SessionTracking, protocol_factory as _protocol_factory, tls_context

log = logging.getLogger("trackrelay.relay")


class SubmissionHandler(SessionTracking):
    """aiosmtpd handler hooks for the submission listener."""

    def __init__(self, config: Config, spool: Batcher[SpoolEntry, tuple[int, list[int]]],
                 on_accepted: Callable[[bool, bool], None] | None = None, crm_lookup: CrmLookup | None = None,
                 handoff: "Handoff | None" = None):
        self.config = config
        self.spool = spool
        self.crm_lookup = crm_lookup
        self.handoff = handoff
        #: (logged to the CRM?, copies handed to this process's worker?) after each commit
        self.on_accepted = on_accepted or (lambda logged, handed: None)
        self.accepted = 0
        #: Metrics: every reply by code, and the final replies to DATA by code.
        self.replies: dict[str, int] = {}
        self.data_replies: dict[str, int] = {}
        self.sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self.tls: ssl.SSLContext | None = None

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        user = acceptance.user_of(self.config, session)
        if user is None:
            return replies.AUTH_REQUIRED
        if address.lower() not in (a.lower() for a in user.addresses):
            return replies.SENDER_NOT_OWNED
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.OK_SENDER

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        problem = recipient_problem(address)
        if problem:
            return problem
        key = canonical(address)
        keys = _recipient_keys(envelope)
        if key in keys:
            return replies.DUPLICATE_RECIPIENT  # one copy, as Postfix does
        if len(envelope.rcpt_tos) >= self.config.relay.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        keys.add(key)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return replies.OK_RECIPIENT

    async def handle_DATA(self, server, session, envelope):
        config = self.config
        user = acceptance.user_of(config, session)
        if user is None:
            return replies.AUTH_REQUIRED
        mail = acceptance.read(envelope.original_content)
        refused = acceptance.refusal(mail, user)
        if refused:
            return refused
        rcpts = acceptance.recipients(config, envelope.rcpt_tos)
        known = await self._known_contacts(user.name, acceptance.contact_keys(config, rcpts))
        if known is None:
            return replies.TEMP_FAILURE
        facts = acceptance.facts(config, mail, rcpts, envelope.mail_from, known)
        entry = acceptance.decide(config, mail, facts, rcpts, user, envelope.mail_from,
                                  acceptance.received(config.relay.hostname, session,
                                                      bool(getattr(server, "_tls_protocol", None))),
                                  acceptance.client_ip(session))
        return await self._commit(entry)

    async def _known_contacts(self, user: str, addresses: set[str]):
        """The CRM's answer about the recipients (``acceptance.NO_CONTACTS`` without a CRM), or
        None when the lookup failed (the message is then answered 451)."""
        if self.crm_lookup is None:
            return acceptance.NO_CONTACTS
        try:
            return await self.crm_lookup(user, addresses)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("CRM lookup failed, answered 451: %s", maillog.error(exc))
            return None

    async def _commit(self, entry: SpoolEntry) -> str:
        """Spool the message durably (handing its copies to this process's worker, claimed, when
        it has room), then the 250 with its queue id; 451 or 554 when the commit failed."""
        handing_over = self.handoff is not None and entry.recipients and self.handoff.ready()
        if handing_over:
            entry.claim_owner, entry.lease_until = self.handoff.lease()
        try:
            pk, copy_ids = await self.spool.submit(entry)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reply = acceptance.commit_refusal(exc)
            if reply == replies.TEMP_FAILURE:
                log.error("spool commit failed, answered 451: %s", maillog.error(exc))
            else:
                log.error("message from %s could not be stored, answered 554: %s", entry.user,
                          maillog.error(exc))
            return reply
        self.accepted += 1
        maillog.log.info("queue_id=%d status=accepted user=%s client=%s size=%d recipients=%d message_id=%s",
                         pk, entry.user, entry.client_ip or "-", len(entry.raw), len(entry.recipients),
                         maillog.quoted(entry.message_id))
        if handing_over:
            self.handoff.take(pk, entry, copy_ids)
        self.on_accepted(entry.log, bool(handing_over))
        return acceptance.accepted(pk)

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %s", maillog.error(error), exc_info=(type(error), error, None))
        return replies.TEMP_FAILURE


def _recipient_keys(envelope) -> set[str]:
    """The canonical forms of the envelope's recipients so far, kept on the envelope (aiosmtpd
    makes a new one per transaction): each RCPT compares against a set, not every earlier one."""
    keys = getattr(envelope, "trackrelay_keys", None)
    if keys is None or len(keys) != len(envelope.rcpt_tos):
        keys = envelope.trackrelay_keys = {canonical(r) for r in envelope.rcpt_tos}
    return keys


class Handoff(Protocol):
    """The worker in this process: freshly spooled copies go to it directly, already claimed."""

    def ready(self) -> bool: ...
    def lease(self) -> tuple[str, "datetime"]: ...
    def take(self, message_pk: int, entry: SpoolEntry, copy_ids: list[int]) -> None: ...


#: (user name, recipient addresses) -> (their existing contacts, team list, the user's list)
CrmLookup = Callable[[str, set[str]], Awaitable[tuple[dict[str, ContactFacts], frozenset[str], frozenset[str]]]]


#: Room kept under the upstream's SIZE for what the relay adds to an accepted message: our
#: Received: (at most about 250 octets), a Message-ID: when it had none, a DKIM-Signature:.
HEADER_ROOM = 2048


class SizeLimit:
    """relay.max_message_bytes, lowered to the upstream's advertised SIZE (less ``HEADER_ROOM``)
    once known, so that what was accepted fits the upstream."""

    def __init__(self, configured: int):
        self.value = configured

    def lower_to(self, advertised: int | None) -> None:
        if advertised and advertised - HEADER_ROOM < self.value:
            self.value = max(advertised - HEADER_ROOM, 1)


def protocol_factory(config: Config, handler: SubmissionHandler, authenticator: Authenticator,
                     size: SizeLimit) -> Callable[[], RelaySMTP]:
    """The submission listener's ``relay.protocol.protocol_factory``: AUTH required, STARTTLS with
    ``relay.tls_cert_file``, the size limit read per connection."""
    ctx = handler.tls = tls_context(config)  # kept: SIGHUP loads a renewed certificate into it
    return _protocol_factory(handler, hostname=config.relay.hostname, data_size_limit=lambda: size.value,
                             auth_required=True, authenticator=authenticator, tls=ctx,
                             plaintext_auth=ctx is None, data_line_limit=config.relay.max_line_octets)


async def start_submission(config: Config, handler: SubmissionHandler, authenticator: Authenticator,
                           size: SizeLimit) -> asyncio.base_events.Server:
    from core.config import parse_hostport
    host, port = parse_hostport(config.relay.listen)
    loop = asyncio.get_running_loop()
    return await loop.create_server(protocol_factory(config, handler, authenticator, size), host, port)
