"""The team's listener's JSON API of the tracking (events, messages), /metrics, /healthz and
/readyz (the routes are listed in ``tracker_http.routes``).

Every API call carries ``Authorization: Bearer <token>`` (the user's token from `new-token`; the
``tracker_http.web`` middleware checks it); errors are JSON: ``{"error": {"code": "...",
"message": "..."}}``. A user sees the tracking of their own messages only; admins see everybody's.
"""

from __future__ import annotations

from aiohttp import web

from storage import events as ev
from storage import feed
from tracker_http.state import CTX
from tracker_http.web import MAX_LIMIT, cursor_param, error, id_param, int_param, json_response, owner_filter, user


async def list_events(request: web.Request) -> web.Response:
    cursor = cursor_param(request)
    limit = int_param(request, "limit", 100, 1, MAX_LIMIT)
    async with request.app[CTX].sessionmaker() as session:
        events = await ev.events_after(session, owner_filter(user(request)), cursor, limit)
    nxt = str(ev.cursor_of(events[-1])) if len(events) == limit else None
    return json_response({"events": [e.to_json() for e in events], "next": nxt})


async def list_messages(request: web.Request) -> web.Response:
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
        msgs = await feed.list_messages(session, owner_filter(user(request)), before, limit,
                                        tracked in ("true", "1"), status=status, search=search)
        items = await feed.feed_json(session, msgs)
    nxt = str(msgs[-1].id) if len(msgs) == limit else None
    return json_response({"messages": items, "next": nxt})


async def get_message(request: web.Request) -> web.Response:
    pk = id_param(request, "no such message")
    async with request.app[CTX].sessionmaker() as session:
        item = await feed.message_with_events(session, pk, owner_filter(user(request)))
    if item is None:
        raise web.HTTPNotFound(text="no such message")
    return json_response(item)


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    if ctx.service_metrics is not None:  # the Service's registry: every role of this process
        return await ctx.service_metrics.response()
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
    service_metrics = request.app[CTX].service_metrics
    problems = await service_metrics.ready() if service_metrics is not None else {}
    if problems:
        return web.json_response({"status": "unready", "unreachable": problems}, status=503)
    return web.json_response({"status": "ready"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def not_found(request: web.Request) -> web.Response:
    return error(404, "not_found", "no such endpoint")
