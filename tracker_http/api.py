"""The team's listener: the JSON API under /api/v1, /metrics and /healthz.

Every API call carries ``Authorization: Bearer <token>`` (the user's token from `new-token`);
errors are JSON: ``{"error": {"code": "...", "message": "..."}}``. A user sees the tracking of
their own messages only; admins see everybody's.
"""

from __future__ import annotations

import hmac
import json

from aiohttp import web

from storage import events as ev
from storage import feed
from tracker_http import sessions
from tracker_http.state import CTX
from core.config import User
from core.passwords import token_hash

USER = web.AppKey("user", User)
MAX_LIMIT = 1000


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler):
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


#: aiohttp >= 3.12 wants a RequestKey (a plain string key warns there); older ones take the string.
DB_TOKEN_USER = web.RequestKey("db_token_user", str) if hasattr(web, "RequestKey") else "db_token_user"


@web.middleware
async def db_tokens(request: web.Request, handler):
    """A bearer token that is not one of the config's is looked up among the tokens made in the
    settings page (``storage.api_tokens``, by its hash), so that ``authenticate`` can stay sync."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if request.path.startswith("/api/") and scheme.lower() == "bearer" and token.strip():
        digest = token_hash(token.strip())
        ctx = request.app[CTX]
        if not any(u.api_token_hash and hmac.compare_digest(u.api_token_hash, digest) for u in ctx.config.users):
            from storage import api_tokens
            async with ctx.sessionmaker() as session:
                name = await api_tokens.user_of(session, digest)
            if name is not None:
                request[DB_TOKEN_USER] = name
    return await handler(request)


def authenticate(request: web.Request, cookie_ok: bool = False) -> User:
    """The user of a bearer token (or, where ``cookie_ok``, of the pages' session cookie)."""
    ctx = request.app[CTX]
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if cookie_ok and not header:
        user = sessions.verify(ctx.keyring, request.cookies.get(sessions.COOKIE), ctx.config)
        if user is not None:
            return user
    if scheme.lower() != "bearer" or not token.strip():
        raise web.HTTPUnauthorized(text="missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    digest = token_hash(token.strip())
    made = request.get(DB_TOKEN_USER)  # a token made in the settings page, of a user still configured
    for user in ctx.config.users:
        if (user.api_token_hash and hmac.compare_digest(user.api_token_hash, digest)) or user.name == made:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            if peer:
                ctx.signed_in.saw(peer[0])
            return user
    raise web.HTTPUnauthorized(text="unknown token", headers={"WWW-Authenticate": "Bearer"})


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


async def list_events(request: web.Request) -> web.Response:
    user = authenticate(request)
    cursor = cursor_param(request)
    limit = int_param(request, "limit", 100, 1, MAX_LIMIT)
    async with request.app[CTX].sessionmaker() as session:
        rows = await ev.list_after(session, None if user.admin else user.name, cursor, limit)
    events = [ev.event_json(e, mid, rcpt) for e, mid, rcpt in rows]
    nxt = str(ev.cursor_of(rows[-1][0])) if len(rows) == limit else None
    return web.json_response({"events": events, "next": nxt}, dumps=lambda o: json.dumps(o, ensure_ascii=False))


async def list_messages(request: web.Request) -> web.Response:
    user = authenticate(request)
    limit = int_param(request, "limit", 50, 1, MAX_LIMIT)
    before = int_param(request, "cursor", 0, 0, 2**62) or None
    tracked = request.query.get("tracked", "").lower()
    if tracked not in ("", "true", "false", "1", "0"):
        raise web.HTTPBadRequest(text="tracked must be true or false")
    status = request.query.get("status") or None
    if status is not None and status not in feed.FILTERS:
        raise web.HTTPBadRequest(text="status must be one of " + ", ".join(feed.FILTERS))
    search = request.query.get("q") or None
    if search is not None and len(search) > 200:
        raise web.HTTPBadRequest(text="q is at most 200 characters")
    async with request.app[CTX].sessionmaker() as session:
        msgs = await feed.list_messages(session, None if user.admin else user.name, before, limit,
                                        tracked in ("true", "1"), status=status, search=search)
        items = await feed.feed_json(session, msgs)
    nxt = str(msgs[-1].id) if len(msgs) == limit else None
    return web.json_response({"messages": items, "next": nxt}, dumps=lambda o: json.dumps(o, ensure_ascii=False))


async def get_message(request: web.Request) -> web.Response:
    user = authenticate(request)
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 18:
        raise web.HTTPNotFound(text="no such message")
    async with request.app[CTX].sessionmaker() as session:
        item = await feed.message_with_events(session, int(raw), None if user.admin else user.name)
    if item is None:
        raise web.HTTPNotFound(text="no such message")
    return web.json_response(item, dumps=lambda o: json.dumps(o, ensure_ascii=False))


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    service_metrics = getattr(ctx, "service_metrics", None)
    if service_metrics is not None:  # the Service's registry (trackrelay.metrics): every role of this process
        from trackrelay.metrics import metrics_response
        return await metrics_response(service_metrics)
    # A Tracker on its own (no Service): what the tracker counts, written out here.
    st = ctx.recorder.stats
    lines = [
        "# HELP trackrelay_tracker_requests_total Requests to the public tracker, by route.",
        "# TYPE trackrelay_tracker_requests_total counter",
    ]
    for route in ("pixel", "click", "click_rejected"):
        lines.append(f'trackrelay_tracker_requests_total{{route="{route}"}} {ctx.metrics.requests[route]}')
    lines += [
        "# HELP trackrelay_events_written_total Events written to the database.",
        "# TYPE trackrelay_events_written_total counter",
        f"trackrelay_events_written_total {st.written}",
        "# HELP trackrelay_event_batches_total Batches of events committed (written / batches: their size).",
        "# TYPE trackrelay_event_batches_total counter",
        f"trackrelay_event_batches_total {st.batches}",
        "# HELP trackrelay_event_buffer_depth Events waiting in memory to be written.",
        "# TYPE trackrelay_event_buffer_depth gauge",
        f"trackrelay_event_buffer_depth {ctx.recorder.depth}",
        "# HELP trackrelay_events_dropped_total Events lost because the buffer was full.",
        "# TYPE trackrelay_events_dropped_total counter",
        f"trackrelay_events_dropped_total {st.dropped}",
        "# HELP trackrelay_event_unknown_tokens_total Hits whose token the database does not know.",
        "# TYPE trackrelay_event_unknown_tokens_total counter",
        f"trackrelay_event_unknown_tokens_total {st.unknown_tokens}",
        "# HELP trackrelay_event_write_failures_total Batches that failed to write and were kept.",
        "# TYPE trackrelay_event_write_failures_total counter",
        f"trackrelay_event_write_failures_total {st.failures}",
        "# HELP trackrelay_event_writer_restarts_total Event writer processes started again after one exited.",
        "# TYPE trackrelay_event_writer_restarts_total counter",
        f"trackrelay_event_writer_restarts_total {st.writer_restarts}",
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def readyz(request: web.Request) -> web.Response:
    """503 with what is unreachable (the database; the upstream where the worker runs too)."""
    service_metrics = getattr(request.app[CTX], "service_metrics", None)
    problems = await service_metrics.ready() if service_metrics is not None else {}
    if problems:
        return web.json_response({"status": "unready", "unreachable": problems}, status=503)
    return web.json_response({"status": "ready"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def not_found(request: web.Request) -> web.Response:
    return error(404, "not_found", "no such endpoint")


async def _end_streams(app: web.Application) -> None:
    """On shutdown: live streams finish their response (a browser's EventSource reconnects later)
    instead of running until the runner's shutdown timeout cancels them."""
    ctx = app[CTX]
    ctx.closing = True
    ctx.bus.notify()


def create_api_app(ctx) -> web.Application:
    app = web.Application(middlewares=[json_errors, db_tokens], client_max_size=1024 * 1024)
    app[CTX] = ctx
    app.on_shutdown.append(_end_streams)
    app.router.add_get("/api/v1/events", list_events)
    from tracker_http.stream import stream
    app.router.add_get("/api/v1/events/stream", stream)
    from tracker_http.openapi import openapi
    app.router.add_get("/api/v1/openapi.json", openapi)
    app.router.add_get("/api/v1/messages", list_messages)
    app.router.add_get("/api/v1/messages/{id}", get_message)
    from tracker_http import crm_api, pages
    crm_api.add_routes(app)
    pages.add_routes(app)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_route("*", "/api/{tail:.*}", not_found)
    return app
