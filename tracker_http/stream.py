"""GET /api/v1/events/stream: the user's events as Server-Sent Events, as they happen.

Authenticated by bearer token or the pages' session cookie (a browser's EventSource cannot send a
header). Each event's SSE id is its cursor in commit order, so a client that reconnects with
``Last-Event-ID`` misses nothing. New events are found by reading the event log: woken at once by
writers in this process, and by polling for those of other processes.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from storage import events as ev
from tracker_http.shapes import dumps
from tracker_http.state import CTX
from tracker_http.web import owner_filter, user

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
BATCH = 200


async def stream(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    who = owner_filter(user(request))
    resume = request.headers.get("Last-Event-ID") or request.query.get("after")
    cursor = ev.parse_cursor(resume) if resume else None
    if resume and cursor is None:
        raise web.HTTPBadRequest(text="Last-Event-ID must be a cursor from this stream")
    async with ctx.sessionmaker() as session:
        cursor = await ev.resolve_cursor(session, cursor) if cursor else await ev.latest_cursor(session, who)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    await response.write(b"retry: 2000\n\n")
    last_write = time.monotonic()
    try:
        while not ctx.closing:
            async with ctx.sessionmaker() as session:
                events = await ev.events_after(session, who, cursor, BATCH)
            for e in events:
                cursor = ev.cursor_of(e)
                data = dumps(e.to_json())
                await response.write(f"id: {cursor}\nevent: {e.type}\ndata: {data}\n\n".encode())
                last_write = time.monotonic()
            if len(events) == BATCH:
                continue
            if time.monotonic() - last_write > KEEPALIVE_SECONDS:
                await response.write(b": keep-alive\n\n")
                last_write = time.monotonic()
            await ctx.bus.wait(POLL_SECONDS)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    return response
