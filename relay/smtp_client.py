"""The upstream's SMTP client: one connection to the smarthost, its greeting, EHLO (HELO from a
server that refuses EHLO), STARTTLS and AUTH, then transactions with one recipient each.

Where the server offers PIPELINING (RFC 2920), MAIL, RCPT and DATA go out in one write and the
message in a second: two round trips a copy instead of four. The message is sent as it was
rendered (CRLF line ends; a stray bare CR or LF is made CRLF first), dot-stuffed with one
``bytes.replace``. Every wait for a reply is bounded by ``timeout``.

What it raises: ``OSError`` and ``ssl.SSLError`` from the socket, ``TimeoutError``, and the
``SmtpError`` family below. A refusal within a transaction is not an exception: ``transaction``
returns the reply that decided it.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections import deque
from dataclasses import dataclass

#: A reply line longer than this is no SMTP server's (RFC 5321 allows 512 octets); nor a reply of
#: more lines, nor more replies waiting than a transaction asks for.
MAX_LINE = 64 * 1024
MAX_LINES = 1000
#: The message goes out in pieces of this size, each written (drained) within the timeout.
CHUNK = 1024 * 1024
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str  # the lines' texts, joined by "\n"

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400


class SmtpError(Exception):
    """The session could not be set up or went wrong (never a refusal within a transaction)."""


class Disconnected(SmtpError):
    """The server closed the connection."""


class BadAddress(ValueError):
    """An envelope address no command may carry (CR, LF or NUL): nothing was sent."""


class Refused(SmtpError):
    """A reply refusing the session: the greeting, EHLO and HELO, STARTTLS or AUTH."""

    def __init__(self, step: str, reply: Reply):
        super().__init__(f"{step}: {reply.code} {reply.text}")
        self.step, self.reply = step, reply


class _Protocol(asyncio.Protocol):
    """Reads replies (multi-line ones whole) into a queue; writes with flow control."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._replies: deque[Reply] = deque()
        self._waiter: asyncio.Future | None = None
        self._lost: BaseException | None = None
        self._drain: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._lost is not None:
            return
        buf = self._buffer
        buf += data
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = bytes(buf[start:end]).removesuffix(b"\r")
            start = end + 1
            if not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b""):
                self._lost = SmtpError("an unreadable reply: " + line[:100].decode("ascii", "replace"))
                self.transport.close()
                break
            self._lines.append(line)
            if line[3:4] != b"-":  # the last line of a reply ("250 x", or a bare "250")
                lines, self._lines = self._lines, []
                self._replies.append(_reply(lines))
        if start:
            del buf[:start]
        if len(buf) > MAX_LINE or len(self._lines) > MAX_LINES or len(self._replies) > MAX_LINES:
            self._lost = SmtpError("more reply than any SMTP server writes")
            self.transport.close()
        self._wake()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._lost is None:
            self._lost = Disconnected(f"connection lost: {exc}" if exc else "the server closed the connection")
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(self._lost)
            self._drain.exception()  # retrieved: nobody may be waiting

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done() and (self._replies or self._lost is not None):
            w.set_result(None)

    def pause_writing(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def write(self, data: bytes, timeout: float) -> None:
        if self._lost is not None:
            raise self._lost
        self.transport.write(data)
        if self._drain is not None and not self._drain.done():
            await asyncio.wait_for(asyncio.shield(self._drain), timeout)

    async def reply(self, timeout: float) -> Reply:
        if self._replies:
            return self._replies.popleft()
        if self._lost is not None:
            raise self._lost
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self._replies:
            return self._replies.popleft()
        raise self._lost

    def queued(self) -> Reply | None:
        """A reply already received and not yet read, if there is one."""
        return self._replies.popleft() if self._replies else None

    @property
    def pending(self) -> bool:
        """Whether anything was received and not yet read as a reply."""
        return bool(self._replies or self._lines or self._buffer)

    @property
    def closing(self) -> bool:
        return self._lost is not None or self.transport is None or self.transport.is_closing()


def _expect(reply: Reply, classes: str) -> Reply:
    """The reply, if its class is one the command can have; else the replies are out of step."""
    if not (200 <= reply.code < 600 and str(reply.code)[0] in classes):
        raise SmtpError(f"a reply out of step with the commands: {reply.code} {reply.text[:100]}")
    return reply


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no reply from the upstream in time"))


def _reply(lines: list[bytes]) -> Reply:
    return Reply(int(lines[-1][:3]), "\n".join(line[4:].decode("utf-8", "replace") for line in lines).strip())


class Connection:
    """One session with the server. ``open`` greets (and secures, and authenticates) it;
    ``transaction`` sends one copy; ``quit`` or ``close`` ends it."""

    def __init__(self, protocol: _Protocol, host: str, timeout: float):
        self._p = protocol
        self._host = host
        self._timeout = timeout
        self.extensions: dict[str, str] = {}
        self.answered = False  # whether the last transaction's MAIL had its reply

    @classmethod
    async def open(cls, host: str, port: int, *, local_hostname: str, timeout: float,
                   tls: ssl.SSLContext | None = None, starttls: ssl.SSLContext | None = None,
                   username: str | None = None, password: str | None = None) -> "Connection":
        """Connect (``tls``: implicit TLS), read the greeting, EHLO; with ``starttls`` STARTTLS is
        required (never a silent fallback to plaintext) and EHLO is said again; AUTH with
        ``username``."""
        loop = asyncio.get_running_loop()
        _, protocol = await asyncio.wait_for(
            loop.create_connection(_Protocol, host, port, ssl=tls, server_hostname=host if tls else None),
            timeout)
        conn = cls(protocol, host, timeout)
        try:
            greeting = await protocol.reply(timeout)
            if greeting.code != 220:
                raise Refused("greeting", greeting)
            if protocol.pending:  # a second greeting would put every reply after it out of step
                raise SmtpError("the upstream greeted more than once")
            await conn._greet(local_hostname)
            if starttls is not None and tls is None:
                if "starttls" not in conn.extensions:
                    raise SmtpError("the upstream does not offer STARTTLS (upstream.starttls = true)")
                reply = await conn._command(b"STARTTLS\r\n")
                if reply.code != 220:
                    raise Refused("STARTTLS", reply)
                if protocol.pending:  # sent before the handshake, read as if after it: an injection
                    raise SmtpError("the upstream sent more than its STARTTLS reply before TLS began")
                transport = await asyncio.wait_for(
                    loop.start_tls(protocol.transport, protocol, starttls, server_hostname=host), timeout)
                protocol.transport = transport
                if protocol.pending:  # arrived in plaintext while start_tls was being scheduled
                    raise SmtpError("the upstream sent more than its STARTTLS reply before TLS began")
                await conn._greet(local_hostname)
            if username:
                await conn._login(username, password or "")
        except BaseException:
            conn.close()
            raise
        return conn

    async def _command(self, line: bytes) -> Reply:
        await self._p.write(line, self._timeout)
        return await self._p.reply(self._timeout)

    async def _greet(self, local_hostname: str) -> None:
        name = local_hostname.encode("idna") if not local_hostname.isascii() else local_hostname.encode()
        reply = await self._command(b"EHLO " + name + b"\r\n")
        if reply.code == 250:
            self.extensions = _extensions(reply.text)
            return
        if self._p.closing:
            raise Refused("EHLO", reply)
        helo = await self._command(b"HELO " + name + b"\r\n")
        if helo.code != 250:
            raise Refused("HELO", helo)
        self.extensions = {}

    async def _login(self, username: str, password: str) -> None:
        methods = self.extensions.get("auth", "").upper().split()
        user, secret = username.encode(), password.encode()
        if "PLAIN" in methods or "LOGIN" not in methods and methods:
            token = base64.b64encode(b"\0" + user + b"\0" + secret)
            reply = await self._command(b"AUTH PLAIN " + token + b"\r\n")
        elif "LOGIN" in methods:
            reply = await self._command(b"AUTH LOGIN\r\n")
            if reply.code == 334:
                reply = await self._command(base64.b64encode(user) + b"\r\n")
            if reply.code == 334:
                reply = await self._command(base64.b64encode(secret) + b"\r\n")
        else:
            raise SmtpError("the upstream offers no AUTH (upstream.username is set)")
        if reply.code != 235:
            raise Refused("AUTH", reply)

    def supports(self, extension: str) -> bool:
        return extension in self.extensions

    @property
    def usable(self) -> bool:
        """Open, and nothing said by the server unasked (an idle connection's 421, say)."""
        return not self._p.closing and not self._p.pending

    async def transaction(self, mail_from: str, rcpt: str, data: bytes, options: list[str],
                          utf8: bool) -> tuple[Reply, bool]:
        """MAIL, RCPT, DATA, the message. Returns (the reply that decided it, whether the
        connection may be reused); raises only when the session broke (``Disconnected``,
        ``TimeoutError``, ``OSError``), ``answered`` then telling whether MAIL had its reply."""
        encoding = "utf-8" if utf8 else "ascii"
        if any(c in a for a in (mail_from, rcpt) for c in "\r\n\x00"):
            raise BadAddress("an envelope address with a line break")  # never a second command
        mail = b"MAIL FROM:<" + mail_from.encode(encoding) + b">" + \
            b"".join(b" " + o.encode("ascii") for o in options) + b"\r\n"
        to = b"RCPT TO:<" + rcpt.encode(encoding) + b">\r\n"
        p, timeout = self._p, self._timeout
        self.answered = False
        if "pipelining" in self.extensions:
            await p.write(mail + to + b"DATA\r\n", timeout)
            got: list[Reply] = []
            try:
                for allowed in ("245", "245", "345"):
                    got.append(_expect(await p.reply(timeout), allowed))
                    self.answered = True
            except Disconnected:
                first = next((r for r in got if r.code // 100 != 2), None)
                if first is None:
                    raise
                return first, False  # a refusal, then the server hung up (Exim's "drop")
            r_mail, r_rcpt, r_data = got
            refused = next((r for r in (r_mail, r_rcpt) if r.code // 100 != 2), None)
            if refused is not None or r_data.code // 100 != 3:
                if r_data.code // 100 == 3:  # a server that took DATA with no recipient: an empty message
                    await p.write(b".\r\n", timeout)
                    await p.reply(timeout)
                return await self._refused(refused or r_data)
        else:
            for line, expected in ((mail, 2), (to, 2), (b"DATA\r\n", 3)):
                r = _expect(await self._command(line), "245" if expected == 2 else "345")
                self.answered = True
                if r.code // 100 != expected:
                    return await self._refused(r)
        body = _stuffed(data)
        try:
            for at in range(0, len(body), CHUNK):  # each chunk's drain within the timeout, not the whole
                await p.write(body[at:at + CHUNK], timeout)
        except Disconnected:
            early = p.queued()  # what the server said before it hung up mid-message (a 552, say)
            if early is None or early.code < 400:
                raise
            return early, False
        final = _expect(await p.reply(timeout), "245")
        return final, final.code != 421

    async def _refused(self, reply: Reply) -> tuple[Reply, bool]:
        if reply.code == 421:
            return reply, False
        try:
            rset = await self._command(b"RSET\r\n")
        except (SmtpError, TimeoutError, OSError):
            return reply, False
        return reply, rset.code == 250

    async def quit(self) -> None:
        try:
            await self._p.write(b"QUIT\r\n", self._timeout)
            await self._p.reply(min(self._timeout, 2.0))
        except (SmtpError, TimeoutError, OSError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        if self._p.transport is not None:
            self._p.transport.close()


def _extensions(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            if keyword.upper().startswith("AUTH="):  # the old form some servers still write
                keyword, params = "AUTH", keyword[5:] + " " + params
            found.setdefault(keyword.lower(), params.strip())
    return found


def _stuffed(data: bytes) -> bytes:
    """The message as DATA sends it: CRLF line ends, dot-stuffed, with the final ``.``."""
    if data.count(b"\n") != data.count(b"\r\n") or data.count(b"\r") != data.count(b"\r\n"):
        data = _LINE_ENDS.sub(b"\r\n", data)
    data = data.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + (b".\r\n" if data.endswith(b"\r\n") or not data else b"\r\n.\r\n")
