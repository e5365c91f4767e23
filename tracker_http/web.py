"""What the API listener's handlers share about a request: who is asking (the authentication
middleware), its parameters, and JSON answers and errors.

Each route says what it needs (``Access``, in ``tracker_http.routes``). The ``authentication``
middleware resolves the bearer token or the pages' session cookie once, before the handler runs,
and puts the user on the request (``user(request)``); a request without what its route needs is
answered here: a JSON 401 for the API (``json_errors`` writes it), a redirect to /login for a page,
a 403 for a form without its CSRF token.
"""

from __future__ import annotations

import enum
import hmac
import json
from urllib.parse import quote

from aiohttp import web

from core.config import User
from core.passwords import token_hash
from storage import api_tokens
from storage import events as ev
from tracker_http import sessions
from tracker_http.shapes import dumps, error_json
from tracker_http.state import CTX

MAX_LIMIT = 1000


def _request_key(name: str, kind):
    #: aiohttp >= 3.12 wants a RequestKey (a plain string key warns there); older ones take the string.
    return web.RequestKey(name, kind) if hasattr(web, "RequestKey") else name


USER = _request_key("user", User)
CSRF = _request_key("csrf", str)


class Access(enum.Enum):
    """What a route needs of the request before its handler runs."""

    #: Nothing: sign-in, health, metrics, the OpenAPI document, static files.
    PUBLIC = "public"
    #: ``Authorization: Bearer <token>`` (a config user's token, or one made in the settings page).
    BEARER = "bearer"
    #: Admins only (a bearer token of an admin); others get a 403.
    ADMIN = "admin"
    #: A bearer token, or without an Authorization header the session cookie (a browser's
    #: EventSource cannot send a header).
    BEARER_OR_COOKIE = "bearer_or_cookie"
    #: A page: the session cookie, else a redirect to /login.
    PAGE = "page"
    #: A form that changes state: a page's session and the form's CSRF token bound to it.
    FORM = "form"


# -- answers ----------------------------------------------------------------------------------

def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(error_json(code, message), status=status)


def json_response(data, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=dumps)


def download(filename: str, _content_type: str, data: bytes) -> web.Response:
    """An attachment: always a download, never rendered (octet-stream, nosniff, sandboxed)."""
    safe = "".join(c if c.isalnum() or c in "._- " else "_" for c in filename)[:200] or "attachment"
    return web.Response(body=data, headers={
        "Content-Type": "application/octet-stream",
        "Content-Disposition": f"attachment; filename=\"{safe}\"; filename*=UTF-8''{quote(filename)}",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
    })


@web.middleware
async def json_errors(request: web.Request, handler):
    """Under /api/: every error as ``{"error": {"code", "message"}}``, a crash as a 500."""
    api = request.path.startswith("/api/")
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400 or not api:
            raise
        return error(e.status, e.reason.lower().replace(" ", "_"), e.text or e.reason)
    except Exception:
        request.app.logger.exception("API error")
        if not api:
            raise web.HTTPInternalServerError(text="internal error") from None
        return error(500, "internal", "internal error")


# -- who is asking ----------------------------------------------------------------------------

#: The Access of each route (``tracker_http.routes`` fills it); a route not in it is PUBLIC.
ACCESS = web.AppKey("access", dict)
#: For routes declared ADMIN: the 403's message.
ADMIN_REFUSAL = web.AppKey("admin_refusal", dict)


def access_of(request: web.Request) -> Access:
    return request.app[ACCESS].get(request.match_info.route, Access.PUBLIC)


@web.middleware
async def authentication(request: web.Request, handler):
    """Resolve the route's user once (``user(request)``), or answer for the handler."""
    access = access_of(request)
    if access is Access.PUBLIC:
        return await handler(request)
    if access in (Access.PAGE, Access.FORM):
        await _page_user(request, form=access is Access.FORM)
    elif access is Access.BEARER_OR_COOKIE and not request.headers.get("Authorization", ""):
        found = await sessions.lookup(request.app[CTX], request.cookies.get(sessions.COOKIE))
        request[USER] = found if found is not None else await _bearer_user(request)
    else:
        request[USER] = user = await _bearer_user(request)
        if access is Access.ADMIN and not user.admin:
            return error(403, "forbidden", request.app[ADMIN_REFUSAL][request.match_info.route])
    return await handler(request)


def user(request: web.Request) -> User:
    """The user the authentication middleware found for this request."""
    return request[USER]


def csrf(request: web.Request) -> str:
    """The CSRF token of a page's session (for the forms it renders)."""
    return request[CSRF]


def peer_ip(request: web.Request) -> str:
    """The address of the connection's peer ("" when unknown)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return peer[0] if peer else ""


async def _bearer_user(request: web.Request) -> User:
    """The user of the bearer token: a config user's, or one made in the settings page
    (``storage.api_tokens``, by its hash) of a user still configured."""
    ctx = request.app[CTX]
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise web.HTTPUnauthorized(text="missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    digest = token_hash(token.strip())
    found = next((u for u in ctx.config.users if u.api_token_hash
                  and hmac.compare_digest(u.api_token_hash, digest)), None)
    if found is None:
        async with ctx.sessionmaker() as session:
            made = await api_tokens.user_of(session, digest)
        found = ctx.config.user(made) if made is not None else None
    if found is None:
        raise web.HTTPUnauthorized(text="unknown token", headers={"WWW-Authenticate": "Bearer"})
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if peer:
        ctx.signed_in.saw(peer[0])
    return found


async def _page_user(request: web.Request, form: bool) -> None:
    """A page's user and CSRF token from the session cookie, or a redirect to /login; a form's
    CSRF token must match the session's."""
    ctx = request.app[CTX]
    cookie = request.cookies.get(sessions.COOKIE)
    found = await sessions.lookup(ctx, cookie) if cookie else None
    if found is None:
        raise web.HTTPSeeOther(f"/login?next={quote(request.rel_url.path_qs, safe='')}")
    ctx.signed_in.saw(peer_ip(request))
    request[USER] = found
    request[CSRF] = sessions.csrf_token(ctx.keyring, cookie)
    if form:
        posted = await request.post()  # kept by aiohttp: the handler's request.post() reads it again
        if not sessions.check_csrf(ctx.keyring, cookie, posted.get("csrf")):
            raise web.HTTPForbidden(text="cross-site request refused (missing or wrong CSRF token)")


# -- parameters -------------------------------------------------------------------------------

def int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise web.HTTPBadRequest(text=f"{name} must be a whole number from {lo} to {hi}")
    return int(raw)


def cursor_param(request: web.Request) -> ev.Cursor:
    raw = request.query.get("cursor") or request.query.get("after")
    cursor = ev.parse_cursor(raw)
    if cursor is None:
        raise web.HTTPBadRequest(text="after must be an event id, cursor a value from next")
    return cursor


def id_param(request: web.Request, not_found: str, name: str = "id") -> int:
    """A path's numeric id (at most 18 digits), else a 404 saying ``not_found``."""
    raw = request.match_info[name]
    if not raw.isdigit() or len(raw) > 18:
        raise web.HTTPNotFound(text=not_found)
    return int(raw)


async def json_body(request: web.Request) -> dict:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object")
    return data


def owner_filter(u: User) -> str | None:
    """Whose messages a user sees: their own; an admin everybody's (None)."""
    return None if u.admin else u.name
