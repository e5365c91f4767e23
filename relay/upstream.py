"""Where copies go: an SMTP smarthost over pooled, reused aiosmtplib connections, or a maildir.

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

import aiosmtplib

from core.config import UpstreamSection

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
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._pacer = Pacer(cfg.max_messages_per_minute)
        self.connections_opened = 0

    def describe(self) -> str:
        return f"{'smtps' if self._implicit_tls else 'smtp'}://{self._host}:{self._port}"

    def _client(self) -> aiosmtplib.SMTP:
        return aiosmtplib.SMTP(
            hostname=self._host, port=self._port, use_tls=self._implicit_tls,
            # starttls = true: STARTTLS is required, never a silent fallback to plaintext.
            start_tls=False if self._implicit_tls else (True if self._cfg.starttls else False),
            username=self._cfg.username, password=self._cfg.password,
            local_hostname=self._local_hostname, timeout=self._cfg.timeout_seconds,
        )

    async def _connect(self) -> aiosmtplib.SMTP:
        client = self._client()
        await client.connect()
        self.connections_opened += 1
        return client

    async def advertised_size(self) -> int | None:
        """The SIZE the upstream advertises, or None (no limit, or unreachable)."""
        try:
            async with self._sem:
                client = await self._connect()
                try:
                    if not client.esmtp_extensions:
                        await client.ehlo()
                    size = client.esmtp_extensions.get("size", "")
                finally:
                    client.close()
            return int(size) if size and size.strip().isdigit() and int(size) > 0 else None
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError, ssl.SSLError):
            return None

    async def send(self, mail_from: str, rcpt: str, data: bytes) -> Result:
        await self._pacer.wait()
        async with self._sem:
            client = self._take_idle()
            try:
                if client is None:
                    client = await self._connect()
                result, keep = await self._transaction(client, mail_from, rcpt, data)
            except _RetryFresh:
                # An idle connection the server had closed: one more try on a new one.
                _close(client)
                try:
                    client = await self._connect()
                    result, keep = await self._transaction(client, mail_from, rcpt, data)
                except _RetryFresh as e:
                    _close(client)
                    return Result("deferred", f"connection lost: {e}")
                except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError, ssl.SSLError) as e:
                    _close(client)
                    return _failure(e)
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError, ssl.SSLError) as e:
                _close(client)
                return _failure(e)
            except BaseException:  # anything else: the connection's state is unknown
                _close(client)
                raise
            if keep:
                self._idle.append((client, time.monotonic()))
            else:
                _close(client)
            return result

    def _take_idle(self) -> aiosmtplib.SMTP | None:
        now = time.monotonic()
        while self._idle:
            client, since = self._idle.pop()
            if client.is_connected and now - since < IDLE_SECONDS:
                return client
            _close(client)
        return None

    async def _transaction(self, client: aiosmtplib.SMTP, mail_from: str, rcpt: str,
                           data: bytes) -> tuple[Result, bool]:
        """One MAIL/RCPT/DATA. Returns the result and whether the connection may be reused."""
        options = []
        encoding = "ascii"
        try:
            if client.is_ehlo_or_helo_needed:  # the options below depend on the extensions
                await _greet(client)
            if client.supports_extension("size"):
                options.append(f"SIZE={len(data)}")
            if not (mail_from.isascii() and rcpt.isascii()):
                # An internationalised address (accepted with SMTPUTF8) goes on only with SMTPUTF8;
                # without it no upstream can take it: a permanent failure (RFC 6531 §3.2).
                if not client.supports_extension("smtputf8"):
                    return Result("bounced", "553 5.6.7 Non-ASCII address, and the upstream does not "
                                             "offer SMTPUTF8"), True
                options.append("SMTPUTF8")
                encoding = "utf-8"
            await client.mail(mail_from, options=options, encoding=encoding)
        except aiosmtplib.SMTPResponseException as e:
            return await _refused(client, e)
        except aiosmtplib.SMTPServerDisconnected as e:
            raise _RetryFresh(str(e)) from e
        try:
            await client.rcpt(rcpt, encoding=encoding)
        except aiosmtplib.SMTPResponseException as e:
            return await _refused(client, e)
        try:
            response = await client.data(data)
        except aiosmtplib.SMTPResponseException as e:
            return _classify(e.code, e.message), e.code != 421
        return _classify(response.code, response.message), True

    async def close(self) -> None:
        while self._idle:
            client, _ = self._idle.pop()
            try:
                await asyncio.wait_for(client.quit(), 2)
            except Exception:
                client.close()


class _RetryFresh(Exception):
    pass


async def _greet(client: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO from a server that refuses EHLO (what aiosmtplib does before MAIL)."""
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not client.is_connected:
            raise
        await client.helo()


async def _refused(client: aiosmtplib.SMTP, e: aiosmtplib.SMTPResponseException) -> tuple[Result, bool]:
    if e.code == 421:
        return _classify(e.code, e.message), False
    try:
        await client.rset()
        return _classify(e.code, e.message), True
    except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
        return _classify(e.code, e.message), False


def _failure(e: BaseException) -> Result:
    if isinstance(e, aiosmtplib.SMTPResponseException):
        return Result("deferred" if e.code < 500 or isinstance(e, aiosmtplib.SMTPConnectResponseError)
                      else "bounced", f"{e.code} {e.message}")
    kind = type(e).__name__
    text = str(e).replace("\r", " ").replace("\n", " ")[:200]
    return Result("deferred", f"{kind}: {text}" if text else kind)


def _close(client: aiosmtplib.SMTP | None) -> None:
    if client is not None:
        try:
            client.close()
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

