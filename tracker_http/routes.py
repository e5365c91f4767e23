"""Every route of the tracker's two listeners, in one place, each with what it needs
(``tracker_http.web.Access``), and the resources each listener opens and closes (the API's
``app.cleanup_ctx``; the public listener's recorder, ``start_recorder``/``stop_recorder``).

The public listener (``tracker.listen``) faces the internet: the pixel, the click redirect and
/healthz, nothing else (``create_public_server``: one handler dispatching by path,
``tracker_http.public.listener``). The API listener (``api.listen``) serves the team: the JSON API under
/api/v1, the live stream, the pages, /metrics, /healthz and /readyz.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from tracker_http import api, classify, crm_api, openapi, pages, public, sessions, stream
from tracker_http.recorder import Recorder
from tracker_http.state import CTX, Context
from tracker_http.web import ACCESS, ADMIN_REFUSAL, Access, authentication, json_errors

PUBLIC, BEARER, ADMIN = Access.PUBLIC, Access.BEARER, Access.ADMIN
PAGE, FORM, BEARER_OR_COOKIE = Access.PAGE, Access.FORM, Access.BEARER_OR_COOKIE

_ID = "{id:\\d{1,18}}"

#: The API listener's routes: (method, path, handler, what it needs), in matching order.
API_ROUTES: list[tuple[str, str, object, Access]] = [
    ("GET", "/api/v1/events", api.list_events, BEARER),
    ("GET", "/api/v1/events/stream", stream.stream, BEARER_OR_COOKIE),
    ("GET", "/api/v1/openapi.json", openapi.openapi, PUBLIC),
    ("GET", "/api/v1/messages", api.list_messages, BEARER),
    ("GET", "/api/v1/messages/{id}", api.get_message, BEARER),
    # the CRM
    ("GET", "/api/v1/contacts/{email}", crm_api.get_contact, BEARER),
    ("PUT", "/api/v1/contacts/{email}", crm_api.put_contact, BEARER),
    ("DELETE", "/api/v1/contacts/{email}", crm_api.delete_contact, ADMIN),
    ("GET", "/api/v1/contacts/{email}/timeline", crm_api.get_timeline, BEARER),
    ("GET", "/api/v1/logged-emails/{id}", crm_api.get_logged, BEARER),
    ("DELETE", "/api/v1/logged-emails/{id}", crm_api.delete_logged, BEARER),
    ("GET", "/api/v1/logged-emails/{id}/thread", crm_api.get_thread, BEARER),
    ("POST", "/api/v1/logged-emails/{id}/pin", crm_api.pin, BEARER),
    ("POST", "/api/v1/logged-emails/{id}/unpin", crm_api.unpin, BEARER),
    ("GET", "/api/v1/attachments/{id}", crm_api.get_attachment, BEARER),
    ("GET", "/api/v1/never-log", crm_api.list_never_log, BEARER),
    ("POST", "/api/v1/never-log", crm_api.add_never_log, BEARER),
    ("DELETE", "/api/v1/never-log", crm_api.remove_never_log, BEARER),
    # the pages
    ("GET", "/login", pages.login_form, PUBLIC),
    ("POST", "/login", pages.login, PUBLIC),
    ("POST", "/logout", pages.logout, FORM),
    ("GET", "/", pages.feed_page, PAGE),
    ("GET", "/dashboard", pages.dashboard_page, PAGE),
    ("GET", f"/messages/{_ID}", pages.message_page, PAGE),
    ("GET", f"/messages/{_ID}/card", pages.message_card, PAGE),
    ("GET", f"/messages/{_ID}/copies/{{rid:\\d{{1,18}}}}", pages.copy_page, PAGE),
    ("GET", f"/messages/{_ID}/copies/{{rid:\\d{{1,18}}}}/body", pages.copy_body, PAGE),
    ("GET", "/export/feed.csv", pages.feed_csv, PAGE),
    ("GET", "/contacts/{email}/activity.csv", pages.contact_csv, PAGE),
    ("GET", "/contacts", pages.contacts_page, PAGE),
    ("GET", "/contacts/{email}", pages.contact_page, PAGE),
    ("GET", "/settings", pages.settings_page, PAGE),
    ("POST", "/settings/never-log/{action}", pages.never_log_action, FORM),
    ("POST", "/settings/tokens", pages.token_create, FORM),
    ("POST", f"/settings/tokens/{_ID}/revoke", pages.token_revoke, FORM),
    ("GET", "/logged-emails/{id:\\d+}/body", pages.logged_body, PAGE),
    ("POST", "/logged-emails/{id:\\d+}/{action}", pages.logged_action, FORM),
    ("GET", "/attachments/{id:\\d+}", pages.attachment_download, PAGE),
    # operations
    ("GET", "/metrics", api.metrics, PUBLIC),
    ("GET", "/healthz", api.healthz, PUBLIC),
    ("GET", "/readyz", api.readyz, PUBLIC),
    ("*", "/api/{tail:.*}", api.not_found, PUBLIC),
]

#: What an ADMIN route answers a user who is not one (403).
ADMIN_REFUSALS = {crm_api.delete_contact: "a GDPR erase is for admins"}


def create_public_server(ctx: Context) -> web.Server:
    """The public listener: aiohttp's low-level server and ``public.listener``'s one handler (the
    pixel, the click, /healthz; the first two also under ``tracker.public_url``'s path), no
    application. What it opens and closes (the event recorder) is ``start_recorder`` and
    ``stop_recorder``, run by ``tracker_http.app.Tracker`` around it. Called on the running loop."""
    prefix = urlsplit(ctx.config.tracker.public_url).path.rstrip("/")
    return web.Server(public.listener(ctx, prefix), access_log=None)


def create_api_app(ctx: Context) -> web.Application:
    app = web.Application(middlewares=[json_errors, authentication], client_max_size=1024 * 1024)
    app[CTX] = ctx
    app[pages.JINJA] = pages.make_env()
    app[pages.LIMITER] = sessions.login_budgets(ctx.config)
    app.on_shutdown.append(_end_streams)
    access, refusals = {}, {}
    for method, path, handler, needs in API_ROUTES:
        for route in _add(app, method, path, handler):
            access[route] = needs
            if needs is ADMIN:
                refusals[route] = ADMIN_REFUSALS[handler]
    app[ACCESS], app[ADMIN_REFUSAL] = access, refusals
    app.router.add_static("/static", pages.HERE / "static", append_version=False)
    return app


def _add(app: web.Application, method: str, path: str, handler, head: bool = True) -> list[web.AbstractRoute]:
    """A route (with ``head``, a GET answers HEAD too, as ``add_get`` does); consecutive routes of
    one path share its resource."""
    resource = app.router.add_resource(path)
    methods = ("HEAD", "GET") if method == "GET" and head else (method,)
    return [resource.add_route(m, handler) for m in methods]


def start_recorder(ctx: Context) -> None:
    """The event recorder runs while the public listener does (its hits are the recorder's input)."""
    if isinstance(ctx.recorder, Recorder):
        classify.warm_up()  # the writer process builds its own
    ctx.recorder.start()


async def stop_recorder(ctx: Context) -> None:
    """At stop, once the public listener has shut down, the recorder writes what it still holds."""
    await ctx.recorder.stop()


async def _end_streams(app: web.Application) -> None:
    """On shutdown (before the runner waits for the handlers still running): live streams finish
    their response (a browser's EventSource reconnects later) instead of running until the
    runner's shutdown timeout cancels them."""
    ctx = app[CTX]
    ctx.closing = True
    ctx.bus.notify()
