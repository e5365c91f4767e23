"""Where copies go: an SMTP smarthost over pooled, reused connections (``relay.smtp_client``), or a
maildir.

``send`` never raises for a delivery problem: it returns what happened as a ``Result`` —
``sent`` (2xx), ``deferred`` (4xx, 421, connection, TLS or timeout failure) or ``bounced`` (5xx).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from core.config import UpstreamSection
from relay.smtp_client import BadAddress, Connection, Disconnected, Refused, SmtpError

log = logging.getLogger("trackrelay.upstream")

IDLE_SECONDS = 30.0


@dataclass(frozen=True)
class Result:
    status: str  # sent | deferred | bounced
    reply: str


def _classify(code: int, text: str) -> Result:
    reply = f"{code} {text}".strip()
    if 200 <= code < 300:
        return Result("sent", reply)
    if 400 <= code < 500:
        return Result("deferred", reply)
    return Result("bounced", reply)


class Pacer:
    """upstream.max_messages_per_minute: evenly spaced sends (0 = no limit)."""

    def __init__(self, per_minute: int):
        self._interval = 60.0 / per_minute if per_minute else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self._interval:
            return
        async with self._lock:
            now = time.monotonic()
            delay = self._next - now
            self._next = max(now, self._next) + self._interval
        if delay > 0:
            await asyncio.sleep(delay)


class SmtpUpstream:
    def __init__(self, cfg: UpstreamSection, local_hostname: str):
        parts = urlsplit(cfg.url)
        self._implicit_tls = parts.scheme == "smtps"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (465 if self._implicit_tls else 25)
        self._cfg = cfg
        self._local_hostname = local_hostname
        self._sem = asyncio.Semaphore(cfg.max_connections)
        self._idle: list[tuple[Connection, float]] = []
        self._pacer = Pacer(cfg.max_messages_per_minute)
        self._tls: ssl.SSLContext | None = None
        self.connections_opened = 0

    def describe(self) -> str:
        return f"{'smtps' if self._implicit_tls else 'smtp'}://{self._host}:{self._port}"

    def _context(self) -> ssl.SSLContext:
        """The system's trust store and host name check (made once, at the first TLS connection)."""
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    async def _connect(self) -> Connection:
        cfg = self._cfg
        tls = self._context() if self._implicit_tls or cfg.starttls else None
        conn = await Connection.open(
            self._host, self._port, local_hostname=self._local_hostname, timeout=cfg.timeout_seconds,
            tls=tls if self._implicit_tls else None,
            # starttls = true: STARTTLS is required, never a silent fallback to plaintext.
            starttls=tls if not self._implicit_tls else None,
            username=cfg.username, password=cfg.password)
        self.connections_opened += 1
        return conn

    async def advertised_size(self) -> int | None:
        """The SIZE the upstream advertises, or None (no limit, or unreachable)."""
        try:
            async with self._sem:
                conn = await self._connect()
                size = conn.extensions.get("size", "")
                await conn.quit()
            return int(size) if size and size.strip().isdigit() and int(size) > 0 else None
        except _BROKEN:
            return None

    async def send(self, mail_from: str, rcpt: str, data: bytes) -> Result:
        await self._pacer.wait()
        async with self._sem:
            conn = self._take_idle()
            try:
                if conn is None:
                    conn = await self._connect()
                result, keep = await self._transaction(conn, mail_from, rcpt, data)
            except _RetryFresh:
                # An idle connection the server had closed: one more try on a new one.
                _close(conn)
                conn = None
                try:
                    conn = await self._connect()
                    result, keep = await self._transaction(conn, mail_from, rcpt, data)
                except _RetryFresh as e:
                    _close(conn)
                    return Result("deferred", str(e.__cause__ or e))
                except _BROKEN as e:
                    _close(conn)
                    return _failure(e)
                except BaseException:
                    _close(conn)
                    raise
            except _BROKEN as e:
                _close(conn)
                return _failure(e)
            except BaseException:  # anything else: the connection's state is unknown
                _close(conn)
                raise
            if keep:
                self._idle.append((conn, time.monotonic()))
            else:
                _close(conn)
            return result

    def _take_idle(self) -> Connection | None:
        now = time.monotonic()
        while self._idle:
            conn, since = self._idle.pop()
            if conn.usable and now - since < IDLE_SECONDS:
                return conn
            _close(conn)
        return None

    async def _transaction(self, conn: Connection, mail_from: str, rcpt: str,
                           data: bytes) -> tuple[Result, bool]:
        """One MAIL/RCPT/DATA. Returns the result and whether the connection may be reused."""
        options = []
        utf8 = not (mail_from.isascii() and rcpt.isascii())
        if conn.supports("size"):
            options.append(f"SIZE={len(data)}")
        if utf8:
            # An internationalised address (accepted with SMTPUTF8) goes on only with SMTPUTF8;
            # without it no upstream can take it: a permanent failure (RFC 6531 §3.2).
            if not conn.supports("smtputf8"):
                return Result("bounced", "553 5.6.7 Non-ASCII address, and the upstream does not "
                                         "offer SMTPUTF8"), True
            options.append("SMTPUTF8")
        try:
            reply, keep = await conn.transaction(mail_from, rcpt, data, options, utf8)
        except BadAddress:  # refused before anything was written: the connection is as it was
            return Result("bounced", "501 5.1.3 An envelope address holds a line break"), True
        except Disconnected as e:
            if not conn.answered:  # closed before MAIL was answered (an idle connection timed out)
                raise _RetryFresh(str(e)) from e
            raise
        return _classify(reply.code, reply.text), keep

    async def close(self) -> None:
        while self._idle:
            conn, _ = self._idle.pop()
            await conn.quit()


#: What a broken session raises: the socket, TLS, a timeout, the SMTP session itself.
_BROKEN = (SmtpError, OSError, asyncio.TimeoutError, TimeoutError, ssl.SSLError, UnicodeError)


class _RetryFresh(Exception):
    pass


def _failure(e: BaseException) -> Result:
    """A session that broke or could not be set up: deferred, as Postfix defers (a refused
    greeting, EHLO, STARTTLS or AUTH included: a smarthost's wrong password must not bounce mail)."""
    if isinstance(e, Refused):
        return Result("deferred", f"{e.reply.code} {e.reply.text} (at {e.step})")
    kind = type(e).__name__
    text = str(e).replace("\r", " ").replace("\n", " ")[:200]
    return Result("deferred", f"{kind}: {text}" if text else kind)


def _close(conn: Connection | None) -> None:
    if conn is not None:
        try:
            conn.close()
        except Exception:
            pass


class MaildirUpstream:
    """The embedded default: each delivered copy becomes a file in PATH/new (for trying it out)."""

    def __init__(self, path: str, local_hostname: str):
        self._path = Path(path)
        self._host = local_hostname.replace("/", "_").replace(":", "_")
        self._seq = 0

    def describe(self) -> str:
        return f"maildir://{self._path}"

    async def advertised_size(self) -> int | None:
        return None

    async def send(self, mail_from: str, rcpt: str, data: bytes) -> Result:
        self._seq += 1
        name = f"{time.time():.6f}.P{os.getpid()}Q{self._seq}.{self._host}"
        envelope = f"Return-Path: <{mail_from}>\r\nDelivered-To: {rcpt}\r\n".encode("utf-8", "replace")
        try:
            await asyncio.to_thread(self._write, name, envelope + data)
        except OSError as e:
            return Result("deferred", f"maildir: {e.strerror}")
        return Result("sent", f"250 2.0.0 delivered to maildir as {name}")

    def _write(self, name: str, data: bytes) -> None:
        for sub in ("tmp", "new", "cur"):
            (self._path / sub).mkdir(parents=True, exist_ok=True)
        tmp = self._path / "tmp" / name
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self._path / "new" / name)

    async def close(self) -> None:
        return None


def make_upstream(cfg: UpstreamSection, local_hostname: str) -> SmtpUpstream | MaildirUpstream:
    parts = urlsplit(cfg.url)
    if parts.scheme == "maildir":
        return MaildirUpstream((parts.netloc + parts.path) or "./outbox", local_hostname)
    return SmtpUpstream(cfg, local_hostname)

