"""The SMTP protocol both listeners speak (submission and inbound), and the one factory that makes it.

:class:`RelaySMTP` is aiosmtpd's SMTP with our replies (``relay.replies.rewrite``: every reply has
an enhanced status code, none carries exception text), route checks on the raw command line, DATA
read in chunks, and every 421 closing the connection. :func:`protocol_factory` builds it for a
handler (``relay.smtp.SubmissionHandler`` or ``relay.inbound.InboundHandler``) and registers each
session with the handler (:class:`SessionTracking`), so that shutdown can end them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import weakref
from typing import Callable

from aiosmtpd.smtp import MISSING, SMTP, syntax

from relay import replies
from relay.auth import AsyncAuth, Authenticator
from core.config import Config
from core.tls import server_context
from core.mailaddr import quote_local, unquote_local


class _QuietAiosmtpd(logging.Filter):
    """aiosmtpd logs every envelope address at INFO and the TLS warning per connection."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "login_data is deprecated" not in record.getMessage()


logging.getLogger("mail.log").addFilter(_QuietAiosmtpd())

#: aiosmtpd's per-session command budgets ("*": any other command).
CALL_LIMITS = {"*": 50, "MAIL": 1000, "RCPT": 100000, "DATA": 1000, "RSET": 1000, "NOOP": 200,
               "AUTH": 20, "EHLO": 20, "HELO": 20, "STARTTLS": 3}
#: How much of the DATA stream is read at a time.
DATA_CHUNK = 256 * 1024
#: Idle seconds before aiosmtpd hangs up.
TIMEOUT = 300


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
        if arg and UNSAFE.search(arg):
            await self.push(replies.BAD_SENDER_ADDRESS)
            return
        if arg and self.session is not None and self.session.authenticated and not path_ok(arg, "FROM:"):
            await self.push(replies.BAD_SENDER_ADDRESS)
            return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str) -> None:
        if arg and self.session is not None and self.session.authenticated:
            if UNSAFE.search(arg):
                await self.push(replies.BAD_ADDRESS)
                return
            if _SOURCE_ROUTE.search(arg):
                await self.push(replies.RELAY_TRICK)
                return
            if not path_ok(arg, "TO:"):  # a comment is not part of a path: never another mailbox
                await self.push(replies.BAD_ADDRESS)
                return
        await super().smtp_RCPT(arg)


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
#: CR, LF or NUL: never in an address.
UNSAFE = re.compile(r"[\r\n\x00]")
_SOURCE_ROUTE = re.compile(r"TO:\s*<\s*@", re.IGNORECASE)

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


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The submission listener's certificate (``relay.tls_cert_file``), or None without one."""
    return server_context(config.relay.tls_cert_file, config.relay.tls_key_file)


def protocol_factory(handler: SessionTracking, *, hostname: str, data_size_limit: int | Callable[[], int],
                     auth_required: bool, authenticator: Authenticator | None = None,
                     tls: ssl.SSLContext | None = None, plaintext_auth: bool = False,
                     data_line_limit: int | None = None,
                     line_length_limit: int | None = None) -> Callable[[], RelaySMTP]:
    """The protocol factory of a listener (``loop.create_server``): a :class:`RelaySMTP` per
    connection serving ``handler``, registered in ``handler.sessions``.

    ``data_size_limit`` is read per connection when it is a callable (the submission listener's
    limit is lowered to the upstream's SIZE once known). With ``tls``, STARTTLS is required;
    AUTH is offered before TLS only with ``plaintext_auth`` (the configuration check decided that
    it may be: loopback, or ``relay.allow_plaintext_auth``). ``data_line_limit``: the longest
    DATA line (``RelaySMTP.data_line_limit`` when None); ``line_length_limit``: the longest
    command line (aiosmtpd's when None)."""
    size = data_size_limit if callable(data_size_limit) else (lambda: data_size_limit)

    def factory() -> RelaySMTP:
        proto = RelaySMTP(
            handler,
            hostname=hostname,
            ident="trackrelay",
            decode_data=False,
            data_size_limit=size(),
            enable_SMTPUTF8=True,
            tls_context=tls,
            require_starttls=tls is not None,
            timeout=TIMEOUT,
            auth_required=auth_required,
            plaintext_auth=plaintext_auth,
            authenticator=authenticator,
            command_call_limit=CALL_LIMITS,
            data_line_limit=data_line_limit,
        )
        if line_length_limit is not None:
            proto.line_length_limit = line_length_limit
        handler.sessions.add(proto)
        return proto

    return factory
