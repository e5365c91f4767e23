"""Responses written as one prepared byte string: the public listener's pixel and redirect.

aiohttp's general response path — a header multidict per response, the content-length, chunking
and keep-alive decisions, the headers serialised, then the body written after them — is about a
fifth of a bare aiohttp server's CPU per request (bench/README.md, "The responses written
whole"). The pixel's response is a constant but for its Date, the redirect's but for its Location
and Date; ``Prepared`` writes each as one bytes string from ``prepare()`` through the request's
stream writer, making the same decisions aiohttp makes for such a response:

- the status line in the request's HTTP version, as aiohttp answers;
- ``Connection: close`` when the connection will not be kept (HTTP/1.1), ``Connection: keep-alive``
  when an HTTP/1.0 connection will be; the handler protocol closes or keeps it by ``keep_alive``;
- no body for HEAD, with the Content-Length a GET would get;
- a Date header (RFC 9110 §6.6.1), formatted once a second; no Server header.

What it does not do: ``on_response_prepare`` signals, compression, cookies — the public listener has
none. A handler returning one must have checked the header values it builds in (``header_safe``).
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate
from types import MappingProxyType

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

_REASONS = {200: b" 200 OK\r\n", 302: b" 302 Found\r\n"}
_VERSIONS = {(1, 1): b"HTTP/1.1", (1, 0): b"HTTP/1.0"}
_SAFE = re.compile(r"[\x20-\x7e]*")
_date = [0, b""]


def header_safe(value: str) -> bool:
    """Printable ASCII only: nothing that could end the header or smuggle another."""
    return _SAFE.fullmatch(value) is not None


def headers(**fields: str) -> bytes:
    """Header lines as bytes (``Content_Type`` → ``Content-Type``)."""
    out = b""
    for name, value in fields.items():
        assert header_safe(value), (name, value)
        out += f"{name.replace('_', '-')}: {value}\r\n".encode("ascii")
    return out


def _date_line() -> bytes:
    now = int(time.time())
    if now != _date[0]:
        _date[1] = f"Date: {formatdate(now, usegmt=True)}\r\n".encode("ascii")
        _date[0] = now
    return _date[1]


class Prepared(web.StreamResponse):
    """A response of ``status`` (200 or 302): the header lines ``head``, which include the
    Content-Length of ``body`` (built once, with ``headers``), then ``body``."""

    #: StreamResponse's own state, never filled here: read-only and shared (its ``__init__``, a
    #: header multidict, a state dict and the reason looked up, is not run: aiohttp's protocol asks
    #: a handler's response only for ``prepare``, ``write_eof`` and ``keep_alive``).
    _headers = CIMultiDictProxy(CIMultiDict())
    _state = MappingProxyType({})
    _keep: bool | None = None  # decided by prepare()
    _written = 0

    def __init__(self, status: int, head: bytes, body: bytes = b""):
        self._status, self._head, self._body = status, head, body

    @property
    def reason(self) -> str:
        return _REASONS[self._status][5:-2].decode("ascii")

    @property
    def keep_alive(self) -> bool | None:
        return self._keep

    @property
    def prepared(self) -> bool:
        return self._keep is not None

    @property
    def body_length(self) -> int:
        return self._written

    async def prepare(self, request: web.BaseRequest) -> None:
        if self._keep is not None:
            return None
        keep = request.keep_alive
        version = _VERSIONS.get(request.version, b"HTTP/1.1")  # HttpVersion is a tuple
        if version == b"HTTP/1.1":
            connection = b"" if keep else b"Connection: close\r\n"
        else:
            connection = b"Connection: keep-alive\r\n" if keep else b""
        data = version + _REASONS[self.status] + self._head + _date_line() + connection + b"\r\n"
        if request.method != "HEAD":
            data += self._body
            self._written = len(self._body)
        self._keep = keep
        # The request's own writer: it refuses a closing transport (ConnectionResetError, which
        # aiohttp's handler expects) and waits while the socket's buffer is over its high-water
        # mark, so a client that pipelines requests and never reads gets no unbounded buffer.
        await request.writer.write_eof(data)
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        assert not data and self._keep is not None
