"""The public listener's handlers: the open pixel, the click redirect and /healthz — nothing
else (``tracker_http.routes`` lists them).

It faces the internet. Handlers answer from memory: the GIF is a constant, the redirect target is
in the signed URL; the event goes to the recorder's buffer. A GET here changes nothing but the
event log.
"""

from __future__ import annotations

import re
from functools import lru_cache
from time import time

from aiohttp import web

from tracker_http.netaddr import client_ip
from tracker_http.prepared import Prepared, header_safe, headers
from tracker_http.state import CTX, Context
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


def _who(request: web.Request, ctx: Context) -> tuple[str, str]:
    # request.remote: the socket's peer, which aiohttp looks up once per connection
    ip = client_ip(request.remote, request.headers.get("X-Forwarded-For"), ctx.trusted_proxies)
    return ip, request.headers.get("User-Agent", "")


async def pixel(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    ctx.metrics.inc("pixel")
    token = request.match_info["token"]
    if _TOKEN.match(token):
        ip, ua = _who(request, ctx)
        ctx.recorder.add(("open", token, request.method, ip, ua, time(), None, None))  # a recorder.Hit
    return Prepared(200, _PIXEL_HEAD, GIF)


async def click(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    ctx.metrics.inc("click")
    found = verify_click(ctx.keyring, request.match_info["rest"])
    head = _redirect_head(found.target) if found is not None else None
    if head is None:
        ctx.metrics.inc("click_rejected")
        raise web.HTTPNotFound(text="Not found\n", headers={"Cache-Control": NO_STORE})
    ip, ua = _who(request, ctx)
    ctx.recorder.add(("click", found.token, request.method, ip, ua, time(), found.target, found.index))
    return Prepared(302, head)


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


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
