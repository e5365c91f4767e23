"""The public listener: the open pixel, the click redirect and /healthz — nothing else.

It faces the internet. Handlers answer from memory: the GIF is a constant, the redirect target is
in the signed URL; the event goes to the recorder's buffer. A GET here changes nothing but the
event log.

The listener is aiohttp's low-level server (``web.Server``) with one handler, ``listener``, that
dispatches by the path itself: no application, router, match info or middleware chain for its
three paths (callgrind, bench/tracker_cost.py). It answers as those routes did: ``/o/{token}.gif``
and ``/c/{rest}`` (a segment of one or more characters but ``/``, ``{``, ``}``), also under
``tracker.public_url``'s path, and ``/healthz``, each to GET and HEAD; another method on one of
them a 405 with ``Allow: GET,HEAD``, any other path a 404; the path matched as aiohttp's router
matches it (``path_safe``: percent-decoded but for ``%2F``; the router then decoded a ``%2F`` in
the matched segment, here it stays as sent: neither a token nor a signed click has one, so the
answer is the same); ``Expect`` as aiohttp's default expect handler answers it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from time import time

from aiohttp import web

from tracker_http.netaddr import client_ip
from tracker_http.prepared import Prepared, header_safe, headers
from tracker_http.state import Context
from core.links import Unrepresentable, to_uri, verify_click

#: The 43-byte transparent 1×1 GIF.
GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
       b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
assert len(GIF) == 43

NO_STORE = "no-store, no-cache, must-revalidate, private, max-age=0"
_PIXEL_HEAD = headers(Content_Type="image/gif", Content_Length=str(len(GIF)), Cache_Control=NO_STORE,
                      Pragma="no-cache", Expires="0", Referrer_Policy="no-referrer")
_REDIRECT_HEAD = headers(Content_Length="0", Cache_Control=NO_STORE, Referrer_Policy="no-referrer")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def _who(request: web.BaseRequest, ctx: Context) -> tuple[str, str]:
    # request.remote: the socket's peer, which aiohttp looks up once per connection
    ip = client_ip(request.remote, request.headers.get("X-Forwarded-For"), ctx.trusted_proxies)
    return ip, request.headers.get("User-Agent", "")


async def pixel(request: web.BaseRequest, ctx: Context, token: str) -> web.StreamResponse:
    ctx.metrics.inc("pixel")
    if _TOKEN.match(token):
        ip, ua = _who(request, ctx)
        ctx.recorder.add(("open", token, request.method, ip, ua, time(), None, None))  # a recorder.Hit
    return Prepared(200, _PIXEL_HEAD, GIF)


async def click(request: web.BaseRequest, ctx: Context, rest: str) -> web.StreamResponse:
    ctx.metrics.inc("click")
    found = verify_click(ctx.keyring, rest)
    head = _redirect_head(found.target) if found is not None else None
    if head is None:
        ctx.metrics.inc("click_rejected")
        raise web.HTTPNotFound(text="Not found\n", headers={"Cache-Control": NO_STORE})
    ip, ua = _who(request, ctx)
    ctx.recorder.add(("click", found.token, request.method, ip, ua, time(), found.target, found.index))
    return Prepared(302, head)


async def healthz(request: web.BaseRequest, ctx: Context | None = None, _: str = "") -> web.Response:
    return web.json_response({"status": "ok"})


_METHODS = frozenset(("GET", "HEAD"))


def _segment(text: str) -> bool:
    """What the router's ``{name}`` matched: one or more characters, none of ``/``, ``{``, ``}``."""
    return bool(text) and "/" not in text and "{" not in text and "}" not in text


def _route(path: str):
    """The handler of a path without the public URL's prefix, and its one parameter; else None."""
    if path.startswith("/c/"):
        rest = path[3:]
        return (click, rest) if _segment(rest) else None
    if path.startswith("/o/") and path.endswith(".gif"):
        token = path[3:-4]
        return (pixel, token) if _segment(token) else None  # the pixel's handler checks _TOKEN
    return None


def listener(ctx: Context, prefix: str):
    """The public listener's one handler (for ``web.Server``): ``prefix`` is ``tracker.public_url``'s
    path without its trailing slash ("" for none)."""
    under = prefix + "/" if prefix else None

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.headers.get("Expect"):  # as aiohttp's application: before any route's answer
            await _expect(request)
        path = request.rel_url.path_safe
        found = _route(path)
        if found is None:
            if under is not None and path.startswith(under):
                found = _route(path[len(prefix):])
            if found is None:
                if path != "/healthz":
                    raise web.HTTPNotFound()
                found = (healthz, "")
        if request.method not in _METHODS:
            raise web.HTTPMethodNotAllowed(request.method, _METHODS)
        return await found[0](request, ctx, found[1])

    return handle


async def _expect(request: web.BaseRequest) -> None:
    """An ``Expect`` header as aiohttp's default expect handler answers it on its routes."""
    if request.version == (1, 1):
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise web.HTTPExpectationFailed(text="Unknown Expect: %s" % request.headers.get("Expect", ""))
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0


@lru_cache(maxsize=4096)
def _redirect_head(target: str) -> bytes | None:
    """The redirect's header lines for a verified target, or None when no Location can carry it so
    that the browser opens what the link said (to_uri: an invalid host, port or IPv6 literal, a
    host IDNA 2008 does not allow, a control character; the relay leaves such links unwrapped,
    but mail signed before it did may still hold some). Cached as verify_click caches the
    decoded targets: every copy of a message carries the same ones, and only a target whose
    signature verified gets here."""
    try:
        location = to_uri(target)
    except Unrepresentable:
        return None
    return b"Location: " + location.encode("ascii") + b"\r\n" + _REDIRECT_HEAD if header_safe(location) else None

