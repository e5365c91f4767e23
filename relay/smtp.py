"""The submission listener: a thin aiosmtpd edge that authenticates, refuses what is wrong, decides
per recipient, spools durably and only then answers 250.

aiosmtpd's own replies that lack an enhanced status code, or that would carry exception text, are
rewritten on their way out (``relay.replies.rewrite``); every 421 closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import ssl
import weakref
from email.utils import formatdate
from datetime import datetime
from typing import Awaitable, Callable, Protocol

from aiosmtpd.smtp import MISSING, SMTP, Session, syntax

from relay import maillog
from relay import message as m
from relay import replies
from relay.auth import AsyncAuth, Authenticator
from core import idn
from core.mailaddr import quote_local, unquote_local
from relay.policy import ContactFacts, MessageFacts, decide
from storage.spool import Batcher, SpoolEntry, SpoolRecipient, transient
from core.config import Config

log = logging.getLogger("trackrelay.relay")

#: Removed before delivery (SPEC §3): they steer us, not the recipient.
CONTROL_HEADERS = {"x-track", "x-log", "x-log-associate"}
MAX_RECEIVED = 100


class _QuietAiosmtpd(logging.Filter):
    """aiosmtpd logs every envelope address at INFO and the TLS warning per connection."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "login_data is deprecated" not in record.getMessage()


logging.getLogger("mail.log").addFilter(_QuietAiosmtpd())


class RelaySMTP(AsyncAuth, SMTP):
    """aiosmtpd's SMTP with our replies, route checks on the raw command line, and 421 = close."""

    #: The longest DATA line accepted, without its CRLF (command lines keep aiosmtpd's limit).
    data_line_limit = 65536

    def __init__(self, *args, plaintext_auth: bool = False, data_line_limit: int | None = None, **kwargs):
        super().__init__(*args, auth_require_tls=True, **kwargs)
        if data_line_limit is not None:
            self.data_line_limit = data_line_limit
        # The configuration check has already decided whether AUTH without TLS is allowed here
        # (loopback, or relay.allow_plaintext_auth); aiosmtpd would warn on every connection.
        self._auth_require_tls = not plaintext_auth
        self._in_data = False

    async def push(self, status):  # type: ignore[override]
        if isinstance(status, str):
            status = replies.rewrite(status)
            counts = getattr(self.event_handler, "replies", None)
            if counts is not None:  # metrics: replies by code (a dict increment)
                code = status[:3]
                counts[code] = counts.get(code, 0) + 1
                if self._in_data and code != "354":
                    self._in_data = False
                    data = self.event_handler.data_replies
                    data[code] = data.get(code, 0) + 1
        await super().push(status)
        if isinstance(status, str) and status.startswith("421") and self.transport is not None:
            self.transport.close()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the body read in chunks rather than line by line (its reader
        costs a call per line). The rules are the same: only CRLF.CRLF ends the data (a bare CR
        or LF never does), too much data (552) or a line over ``data_line_limit`` octets without its
        CRLF (500; ``relay.max_line_octets``, far above RFC 5322's 998, which real clients pass) is
        answered once the end has arrived, and a leading dot is removed (RFC 5321 §4.5.2)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        self._in_data = True  # the next reply but 354 is DATA's (counted by push)
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        data = await self._read_data()
        if data is None:  # the client went away
            return
        if data is _TOO_MUCH:
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()
            return
        if _has_long_line(data, self.data_line_limit + 2):
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            self._set_post_data_state()
            return
        if data.startswith(b"."):  # dot-unstuffing: every line's leading dot goes
            del data[0]
        original = bytes(data).replace(b"\r\n.", b"\r\n")
        self.envelope.original_content = original
        self.envelope.content = (original.decode("utf-8", errors="surrogateescape") if self._decode_data
                                 else original)
        status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self):
        """The raw data up to (not including) the ending ``.``CRLF, dot-stuffed as sent; or
        ``_TOO_MUCH`` (read to its end and dropped); or None if the connection ended first."""
        limit = self.data_size_limit
        buf = bytearray(b"\r\n")  # so that a first line of a lone dot ends the data as well
        too_much = False
        while True:
            search_from = max(len(buf) - 4, 0)
            try:
                chunk = await self._reader.read(DATA_CHUNK)
            except asyncio.CancelledError:
                self._writer.close()
                raise
            if not chunk:
                self._writer.close()
                return None
            buf += chunk
            end = buf.find(b"\r\n.\r\n", search_from)
            if end >= 0:
                break
            if limit and len(buf) - 2 > limit:  # keep reading to the end, keep nothing but a tail
                too_much = True
                del buf[:-4]
        rest = buf[end + 5:]
        if rest:  # pipelined commands after the final dot: back to the reader for the command loop
            self._reader._buffer[0:0] = rest
        if too_much or (limit and end > limit):
            return _TOO_MUCH
        del buf[end + 2:]
        del buf[:2]
        return buf

    def _getaddr(self, arg: str):
        """aiosmtpd parses every MAIL and RCPT address with the email package's header parser
        (and defines a class per call). The everyday ``<dot-atom@domain> options`` form is read
        here with one regex, giving the same (address, rest); anything else goes to aiosmtpd."""
        simple = _SIMPLE_PATH.match(arg)
        if simple is None:
            address, rest = super()._getaddr(arg)
            if address and "@" in address and '"' in arg:
                # the email package's addr_spec drops quotes the local part needs
                # ("neko....nyaan"@example.org is no address without them): put them back
                local, _, domain = address.rpartition("@")
                address = f"{quote_local(unquote_local(local))}@{domain}"
            return address, rest
        address, rest = simple.group(1), simple.group(2)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    async def smtp_MAIL(self, arg: str) -> None:
        if arg and _UNSAFE.search(arg):
            await self.push(replies.BAD_SENDER_ADDRESS)
            return
        if arg and self.session is not None and self.session.authenticated and not path_ok(arg, "FROM:"):
            await self.push(replies.BAD_SENDER_ADDRESS)
            return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str) -> None:
        if arg and self.session is not None and self.session.authenticated:
            if _UNSAFE.search(arg):
                await self.push(replies.BAD_ADDRESS)
                return
            if _SOURCE_ROUTE.search(arg):
                await self.push(replies.RELAY_TRICK)
                return
            if not path_ok(arg, "TO:"):  # a comment is not part of a path: never another mailbox
                await self.push(replies.BAD_ADDRESS)
                return
        await super().smtp_RCPT(arg)


DATA_CHUNK = 256 * 1024
_TOO_MUCH = object()


def _has_long_line(data: bytearray, limit: int) -> bool:
    """A line longer than ``limit`` octets with its CRLF (as aiosmtpd counts them)?"""
    if len(data) <= limit:
        return False
    if data.count(b"\n") == data.count(b"\r\n"):
        # only CRLF line ends: a line too long is a piece between LFs of `limit` octets or more
        return max(map(len, data.split(b"\n"))) >= limit
    pos = 0  # bare LFs inside lines: measure CRLF-delimited lines one by one
    while pos < len(data):
        nxt = data.find(b"\r\n", pos)
        nxt = len(data) if nxt < 0 else nxt + 2
        if nxt - pos > limit:
            return True
        pos = nxt
    return False


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(rf"\s*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*+(?!\()(.*)\Z", re.DOTALL)
_UNSAFE = re.compile(r"[\r\n\x00]")
_SOURCE_ROUTE = re.compile(r"TO:\s*<\s*@", re.IGNORECASE)
_DOMAIN = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
                     r"|^\[[0-9a-f:.]+\]$", re.IGNORECASE)


def recipient_problem(address: str) -> str | None:
    """Why an envelope recipient is refused, or None. Relay tricks get 5.7.1."""
    if _UNSAFE.search(address) or address.count('"') % 2:
        return replies.BAD_ADDRESS
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return replies.BAD_ADDRESS
    if "@" in local or "%" in local or "!" in local or ":" in local.split('"')[0]:
        return replies.RELAY_TRICK
    ascii_domain = domain if domain.startswith("[") else idn.to_ascii_or_none(domain)
    if ascii_domain is None or not _DOMAIN.match(ascii_domain):
        return replies.BAD_ADDRESS
    return None


# RFC 5321 §4.1.2 paths (RFC 6531: UTF-8 in atoms and quoted strings). Dots are taken loosely, as
# Postfix takes them (``a..b@`` exists at Japanese carriers); comments, spaces outside quotes and
# anything after the closing ``>`` but parameters are not a path.
_U8 = r"[^\x00-\x7f]"
_LOCAL = (rf"(?:[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~.-]|{_U8})+"
          rf'|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e]|{_U8})*"')
_PATH_DOMAIN = rf"(?:[A-Za-z0-9-]|{_U8})+(?:\.(?:[A-Za-z0-9-]|{_U8})+)*\.?|\[[^\[\]\\\s]+\]"
_PATH = re.compile(rf"[ \t]*(<)?(?:{_LOCAL})@(?:{_PATH_DOMAIN})(?(1)>)(?:[ \t]|\Z)")


def path_ok(arg: str, prefix: str) -> bool:
    """Is the path of ``MAIL FROM:``/``RCPT TO:`` (``arg`` without the verb) RFC 5321 syntax?
    The null path ``<>`` is; aiosmtpd's own parser would read ``<v(comment)ictim@x>`` as the
    mailbox ``"v ictim"@x``."""
    if not arg[:len(prefix)].upper() == prefix:
        return True  # aiosmtpd answers the syntax error itself
    path = arg[len(prefix):]
    return path.lstrip(" \t").startswith("<>") or _PATH.match(path) is not None


def canonical(address: str) -> str:
    """An address as compared (duplicates, ownership): quoted only where the local part needs it,
    lower-cased (as every mail system treats it), the domain in IDNA 2008 ASCII."""
    local, _, domain = address.rpartition("@")
    return idn.address_key(f"{quote_local(unquote_local(local))}@{domain}")


def sender_problem(fs: list[m.Field], owned: set[str]) -> str | None:
    """Why the From:/Sender: headers break the sender binding, or None. From: must exist; each
    From: and Sender: must hold at least one address, every address in it the user's — as a modern
    parser reads it (RFC 2047 decoded, comments removed) and as older ones would."""
    if not any(f.name == "from" for f in fs):
        return replies.FROM_MISSING
    for f in fs:
        if f.name not in ("from", "sender"):
            continue
        label = "From:" if f.name == "from" else "Sender:"
        found = m.mailboxes(f.value)
        if found is None:
            return replies.header_rule(label, "is not a valid address list (RFC 5322)")
        if not found:
            return replies.header_rule(label, "must contain the authenticated user's address")
        seen = found + m.addresses(f.value) + m.addresses(m.decoded(f.value))
        if any(canonical(a) not in owned for a in seen):
            return replies.header_rule(label, "names an address not owned by the authenticated user")
    return None


class SessionTracking:
    """The SMTP sessions a handler serves, so that shutdown can end them before the database."""

    sessions: weakref.WeakSet

    async def close_sessions(self, grace: float = 5.0) -> None:
        """At shutdown, after the spool has drained: hang up on clients and let their session
        tasks end (none may still be using the database when it is closed)."""
        tasks = []
        for proto in list(self.sessions):
            if proto.transport is not None:
                proto.transport.close()
            task = getattr(proto, "_handler_coroutine", None)
            if task is not None and not task.done():
                tasks.append(task)
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


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

    def _user(self, session: Session):
        name = session.auth_data if isinstance(session.auth_data, str) else None
        return self.config.user(name) if name else None

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        user = self._user(session)
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
        if any(canonical(r) == key for r in envelope.rcpt_tos):
            return replies.DUPLICATE_RECIPIENT  # one copy, as Postfix does
        if len(envelope.rcpt_tos) >= self.config.relay.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return replies.OK_RECIPIENT

    async def handle_DATA(self, server, session, envelope):
        user = self._user(session)
        if user is None:
            return replies.AUTH_REQUIRED
        raw = m.normalize_crlf(envelope.original_content or b"")
        fs = m.fields(raw)
        if m.count(fs, "received") >= MAX_RECEIVED:
            return replies.LOOP
        problem = sender_problem(fs, {canonical(a) for a in user.addresses})
        if problem:
            return problem
        bcc = self.config.log_bcc_address
        rcpts = [r for r in envelope.rcpt_tos if r.lower() != bcc]
        log_bcc = len(rcpts) != len(envelope.rcpt_tos)
        try:
            contacts, never_team, never_personal = (
                await self.crm_lookup(user.name, {r.lower() for r in rcpts}) if self.crm_lookup
                else ({}, frozenset(), frozenset()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("CRM lookup failed, answered 451: %s", maillog.error(exc))
            return replies.TEMP_FAILURE
        facts = MessageFacts(
            user_addresses=self.config.user_addresses,
            internal_domains=self.config.internal_domains,
            x_track=m.get(fs, "x-track"),
            x_log=m.get(fs, "x-log"),
            log_bcc=log_bcc,
            sender=envelope.mail_from or "",
            contacts=contacts,
            never_log_team=never_team,
            never_log_personal=never_personal,
            team_addresses=frozenset(a.lower() for a in self.config.crm.team_addresses),
        )
        log_associate = m.get(fs, "x-log-associate")
        spooled = m.remove(raw, CONTROL_HEADERS)
        message_id = m.get(fs, "message-id")
        if not message_id:
            message_id = f"<{secrets.token_hex(16)}@{self.config.relay.hostname}>"
            spooled = m.insert_after_head(spooled, f"Message-ID: {message_id}".encode())
        spooled = m.prepend(spooled, self._received(server, session))
        decisions = [decide(self.config, facts, r) for r in rcpts]
        entry = SpoolEntry(
            message_id=m.text(message_id)[:998], user=user.name, mail_from=envelope.mail_from or "",
            raw=spooled,
            recipients=[SpoolRecipient(d.address, d.token, d.track_opens, d.track_clicks, d.log,
                                       d.reasons, d.never_log) for d in decisions],
            from_header=m.decoded(m.get(fs, "from"))[:2000],
            subject=m.decoded(m.get(fs, "subject"))[:2000],
            client_ip=session.peer[0] if isinstance(session.peer, tuple) else None,
            log=any(d.log for d in decisions) or (log_bcc and not rcpts),
            log_associate=m.text(log_associate) if log_associate else None,
        )
        handing_over = self.handoff is not None and entry.recipients and self.handoff.ready()
        if handing_over:
            entry.claim_owner, entry.lease_until = self.handoff.lease()
        try:
            pk, copy_ids = await self.spool.submit(entry)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if transient(exc):
                log.error("spool commit failed, answered 451: %s", maillog.error(exc))
                return replies.TEMP_FAILURE
            log.error("message from %s could not be stored, answered 554: %s", user.name, maillog.error(exc))
            return replies.UNSTORABLE
        self.accepted += 1
        maillog.log.info("queue_id=%d status=accepted user=%s client=%s size=%d recipients=%d message_id=%s",
                         pk, user.name, entry.client_ip or "-", len(spooled), len(entry.recipients),
                         maillog.quoted(entry.message_id))
        if handing_over:
            self.handoff.take(pk, entry, copy_ids)
        self.on_accepted(entry.log, bool(handing_over))
        return replies.OK_QUEUED.format(id=pk)

    def _received(self, server: SMTP, session: Session) -> bytes:
        helo = re.sub(r"[^\w.\-\[\]:]", "?", session.host_name or "unknown")[:100]
        ip = session.peer[0] if isinstance(session.peer, tuple) else "unknown"
        proto = "ESMTPSA" if getattr(server, "_tls_protocol", None) else "ESMTPA"
        return (f"Received: from {helo} ([{ip}])\r\n\tby {self.config.relay.hostname} (trackrelay) "
                f"with {proto};\r\n\t{formatdate(localtime=False, usegmt=True)}").encode()

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %s", maillog.error(error), exc_info=(type(error), error, None))
        return replies.TEMP_FAILURE


class Handoff(Protocol):
    """The worker in this process: freshly spooled copies go to it directly, already claimed."""

    def ready(self) -> bool: ...
    def lease(self) -> tuple[str, "datetime"]: ...
    def take(self, message_pk: int, entry: SpoolEntry, copy_ids: list[int]) -> None: ...


#: (user name, recipient addresses) -> (their existing contacts, team list, the user's list)
CrmLookup = Callable[[str, set[str]], Awaitable[tuple[dict[str, ContactFacts], frozenset[str], frozenset[str]]]]

CALL_LIMITS = {"*": 50, "MAIL": 1000, "RCPT": 100000, "DATA": 1000, "RSET": 1000, "NOOP": 200,
               "AUTH": 20, "EHLO": 20, "HELO": 20, "STARTTLS": 3}


def tls_context(config: Config) -> ssl.SSLContext | None:
    if not config.relay.tls_cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(config.relay.tls_cert_file, config.relay.tls_key_file)
    return ctx


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
    ctx = handler.tls = tls_context(config)  # kept: SIGHUP loads a renewed certificate into it

    def factory() -> RelaySMTP:
        proto = RelaySMTP(
            handler,
            hostname=config.relay.hostname,
            ident="trackrelay",
            decode_data=False,
            data_size_limit=size.value,
            enable_SMTPUTF8=True,
            tls_context=ctx,
            require_starttls=ctx is not None,
            timeout=300,
            auth_required=True,
            plaintext_auth=ctx is None,
            authenticator=authenticator,
            command_call_limit=CALL_LIMITS,
            data_line_limit=config.relay.max_line_octets,
        )
        handler.sessions.add(proto)
        return proto

    return factory


async def start_submission(config: Config, handler: SubmissionHandler, authenticator: Authenticator,
                           size: SizeLimit) -> asyncio.base_events.Server:
    from core.config import parse_hostport
    host, port = parse_hostport(config.relay.listen)
    loop = asyncio.get_running_loop()
    return await loop.create_server(protocol_factory(config, handler, authenticator, size), host, port)

