"""Server-rendered pages on the API listener: sign-in, the activity feed, a message, a contact's
timeline. They work without JavaScript (live updates excepted); output is escaped everywhere (a
subject or a user agent is attacker-controlled); a logged HTML body is shown only inside a
sandboxed iframe under a restrictive Content-Security-Policy; forms that change state carry a
CSRF token bound to the session; the session cookie is HttpOnly and SameSite=Strict, Secure when
the browser came over https, and ends server-side at logout (``tracker_http.sessions``). Sign-in
attempts spend the sign-in budgets (per user name, per client network) before the password is
checked, in a worker thread; an unknown name costs the same hash as a known one.
"""

from __future__ import annotations

import asyncio
import secrets
from datetime import datetime
from pathlib import Path
from urllib.parse import quote, urlsplit

import jinja2
from aiohttp import web

from storage import crm as q
from storage import feed
from tracker_http import sessions
from tracker_http.crm_api import attachment_response, contact_json, logged_json
from tracker_http.netaddr import client_ip
from tracker_http.state import CTX
from trackrelay.attempts import Attempt, AttemptBudgets
from trackrelay.config import User
from trackrelay.passwords import CHECKER, Busy, hash_for

HERE = Path(__file__).parent
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: A logged body is attacker-controlled HTML: no scripts, no forms, no remote loads, its own origin.
BODY_CSP = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'self'"
LOGIN_NONCE = "trackrelay_login"
LIMITER = web.AppKey("login_budgets", AttemptBudgets)
JINJA = web.AppKey("jinja", jinja2.Environment)


def _when(value) -> str:
    if not value:
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.strftime("%Y-%m-%d %H:%M UTC")


def make_env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["when"] = _when
    env.filters["urlencode"] = lambda v: quote(str(v), safe="@")
    return env


def render(request: web.Request, template: str, status: int = 200, **context) -> web.Response:
    html = request.app[JINJA].get_template(template).render(**context)
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8",
                        headers=_page_headers())


def _page_headers() -> dict[str, str]:
    return {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin", "Cache-Control": "no-store", "X-Frame-Options": "DENY"}


def _peer(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return peer[0] if peer else ""


def signed_in(request: web.Request) -> tuple[User, str]:
    """The user and the CSRF token of the session, or a redirect to /login."""
    ctx = request.app[CTX]
    cookie = request.cookies.get(sessions.COOKIE)
    user = sessions.verify(ctx.keyring, cookie, ctx.config)
    if user is None:
        raise web.HTTPSeeOther(f"/login?next={quote(request.rel_url.path_qs, safe='')}")
    ctx.signed_in.saw(_peer(request))
    return user, sessions.csrf_token(ctx.keyring, cookie)


async def _checked_form(request: web.Request) -> tuple[User, dict]:
    """A state-changing POST: signed in, and the form's CSRF token matches the session."""
    user, _ = signed_in(request)
    form = await request.post()
    ctx = request.app[CTX]
    if not sessions.check_csrf(ctx.keyring, request.cookies.get(sessions.COOKIE), form.get("csrf")):
        raise web.HTTPForbidden(text="cross-site request refused (missing or wrong CSRF token)")
    return user, dict(form)


def _safe_next(value: str | None) -> str:
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value or urlsplit(value).netloc:
        return "/"
    return value


# -- sign-in ------------------------------------------------------------------------------------

async def login_form(request: web.Request) -> web.Response:
    nonce = secrets.token_urlsafe(16)
    resp = render(request, "login.html", user=None, error=None, username="", login_nonce=nonce,
                  next=_safe_next(request.query.get("next")))
    resp.set_cookie(LOGIN_NONCE, nonce, httponly=True, samesite="Strict", max_age=3600, path="/login")
    return resp


async def login(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    form = await request.post()
    name, password = str(form.get("username", "")), str(form.get("password", ""))
    nonce = request.cookies.get(LOGIN_NONCE)
    nxt = _safe_next(str(form.get("next", "/")))

    def again(error: str, status: int) -> web.Response:
        fresh = secrets.token_urlsafe(16)
        resp = render(request, "login.html", status=status, user=None, error=error, username=name,
                      login_nonce=fresh, next=nxt)
        resp.set_cookie(LOGIN_NONCE, fresh, httponly=True, samesite="Strict", max_age=3600, path="/login")
        return resp

    if not nonce or form.get("csrf") != nonce:
        return again("Your sign-in form expired; please try again.", 403)
    attempt = request.app[LIMITER].begin(name, _client(request))
    if not isinstance(attempt, Attempt):  # no password checked: the answer says nothing about it
        resp = again("Too many failed attempts. Try again later.", 429)
        resp.headers["Retry-After"] = str(attempt)
        return resp
    user, stored = hash_for(ctx.config, name)
    # Shielded: a client that hangs up mid-check still has its attempt counted.
    ok = await asyncio.shield(asyncio.ensure_future(_check(attempt, password, stored, user is not None)))
    if ok is None:
        resp = again("The server is busy; please try again in a moment.", 503)
        resp.headers["Retry-After"] = "2"
        return resp
    if not ok:
        return again("Wrong user name or password.", 401)
    assert user is not None
    resp = web.HTTPSeeOther(nxt)
    sessions.set_cookie(resp, await sessions.begin(ctx, user), max_age=ctx.config.api.session_max_seconds,
                        secure=sessions.is_https(request, ctx.trusted_proxies))
    resp.del_cookie(LOGIN_NONCE, path="/login")
    raise resp


async def _check(attempt: Attempt, password: str, stored: str, known: bool) -> bool | None:
    """Verify in a worker thread and count the outcome; None when too busy to check."""
    try:
        ok = await CHECKER.check(password, stored) and known
    except Busy:
        attempt.released()
        return None
    except BaseException:
        attempt.failed()
        raise
    if ok:
        attempt.succeeded()
    else:
        attempt.failed()
    return ok


def _client(request: web.Request) -> str:
    """The client's address (X-Forwarded-For believed from tracker.trusted_proxies only)."""
    ctx = request.app[CTX]
    return client_ip(_peer(request), request.headers.get("X-Forwarded-For"), ctx.trusted_proxies)


async def logout(request: web.Request) -> web.Response:
    await _checked_form(request)
    await sessions.end(request.app[CTX], request.cookies.get(sessions.COOKIE))
    resp = web.HTTPSeeOther("/login")
    resp.del_cookie(sessions.COOKIE, path="/")
    raise resp


# -- pages --------------------------------------------------------------------------------------

async def feed_page(request: web.Request) -> web.Response:
    user, csrf = signed_in(request)
    tracked = request.query.get("tracked") in ("1", "true")
    cursor = request.query.get("cursor", "")
    before = int(cursor) if cursor.isdigit() and len(cursor) < 19 else None
    async with request.app[CTX].sessionmaker() as s:
        msgs = await feed.list_messages(s, None if user.admin else user.name, before, 50, tracked)
        items = await feed.feed_json(s, msgs)
    return render(request, "feed.html", user=user, csrf=csrf, messages=items, tracked=tracked,
                  next=str(msgs[-1].id) if len(msgs) == 50 else None)


async def message_page(request: web.Request) -> web.Response:
    user, csrf = signed_in(request)
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 18:
        raise web.HTTPNotFound(text="no such message")
    async with request.app[CTX].sessionmaker() as s:
        item = await feed.message_with_events(s, int(raw), None if user.admin else user.name)
    if item is None:
        raise web.HTTPNotFound(text="no such message")
    return render(request, "message.html", user=user, csrf=csrf, m=item, events=item["events"])


async def contact_page(request: web.Request) -> web.Response:
    user, csrf = signed_in(request)
    email = request.match_info["email"].strip().lower()
    thread_key = request.query.get("thread")
    async with request.app[CTX].sessionmaker() as s:
        contact = await q.get_contact(s, email)
        if contact is None:
            raise web.HTTPNotFound(text="no such contact")
        cj = await contact_json(s, contact)
        emails = await q.thread(s, thread_key) if thread_key else await q.timeline(s, contact.id)
        atts = await q.attachments_of(s, [e.id for e in emails])
        items = []
        for e in emails:
            full = await q.logged_email(s, e.id, bodies=True)
            d = logged_json(full, atts.get(e.id, []), bodies=True)
            d["has_html"] = bool(full.html)
            items.append(d)
    return render(request, "contact.html", user=user, csrf=csrf, contact=cj, emails=items,
                  thread=thread_key, back=request.rel_url.path_qs)


async def logged_body(request: web.Request) -> web.Response:
    signed_in(request)
    async with request.app[CTX].sessionmaker() as s:
        e = await q.logged_email(s, int(request.match_info["id"]), bodies=True)
    if e is None or not e.html:
        raise web.HTTPNotFound(text="no such body")
    return web.Response(text=e.html, content_type="text/html", charset="utf-8", headers={
        "Content-Security-Policy": BODY_CSP, "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})


async def logged_action(request: web.Request) -> web.Response:
    user, form = await _checked_form(request)
    action = request.match_info["action"]
    pk = int(request.match_info["id"])
    async with request.app[CTX].sessionmaker() as s:
        async with s.begin():
            e = await q.logged_email(s, pk)
            if e is None:
                raise web.HTTPNotFound(text="no such logged email")
            if action in ("pin", "unpin"):
                e.pinned = action == "pin"
            elif action == "delete":
                if not user.admin and e.user != user.name:
                    raise web.HTTPForbidden(text="only its sender or an admin may delete a logged email")
                await q.delete_logged_email(s, pk)
            else:
                raise web.HTTPNotFound(text="no such action")
    raise web.HTTPSeeOther(_safe_next(form.get("back")))


async def attachment_download(request: web.Request) -> web.Response:
    signed_in(request)
    async with request.app[CTX].sessionmaker() as s:
        found = await q.attachment_bytes(s, int(request.match_info["id"]))
    if found is None:
        raise web.HTTPNotFound(text="no such attachment")
    return attachment_response(*found)


def add_routes(app: web.Application) -> None:
    app[JINJA] = make_env()
    app[LIMITER] = sessions.login_budgets(app[CTX].config)
    app.middlewares.append(sessions.middleware)
    r = app.router
    r.add_get("/login", login_form)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    r.add_get("/", feed_page)
    r.add_get("/messages/{id:\\d+}", message_page)
    r.add_get("/contacts/{email}", contact_page)
    r.add_get("/logged-emails/{id:\\d+}/body", logged_body)
    r.add_post("/logged-emails/{id:\\d+}/{action}", logged_action)
    r.add_get("/attachments/{id:\\d+}", attachment_download)
    r.add_static("/static", HERE / "static", append_version=False)
