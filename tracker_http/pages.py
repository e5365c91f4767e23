"""Server-rendered pages on the API listener: sign-in, the dashboard, the activity feed, a
message, contacts and a contact's timeline, settings. They work without JavaScript (live updates excepted); output is escaped everywhere (a
subject or a user agent is attacker-controlled); a logged HTML body is shown only inside a
sandboxed iframe under a restrictive Content-Security-Policy; forms that change state carry a
CSRF token bound to the session; the session cookie is HttpOnly and SameSite=Strict, Secure when
the browser came over https, and ends server-side at logout (``tracker_http.sessions``). Sign-in
attempts spend the sign-in budgets (per user name, per client network) before the password is
checked, in a worker thread; an unknown name costs the same hash as a known one.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo
from urllib.parse import quote, unquote, urlsplit

import jinja2
from aiohttp import web
from markupsafe import Markup

from core.attempts import Attempt, AttemptBudgets
from core.config import User
from core.neverlog import normalise_entry
from core.passwords import CHECKER, Busy, hash_for, token_hash
from core.reasons import Reason
from storage import api_tokens, dashboard, edits, feed, messages
from storage import crm as q
from tracker_http import charts, sessions
from tracker_http.classify import client_of, is_scanner_agent
from tracker_http.netaddr import client_ip
from tracker_http.shapes import contact_json, logged_json
from tracker_http.state import CTX
from tracker_http.web import csrf as csrf_of
from tracker_http.web import download, peer_ip
from tracker_http.web import user as user_of

HERE = Path(__file__).parent
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: A logged body is attacker-controlled HTML: no scripts, no forms, no remote loads, its own origin.
BODY_CSP = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'self'"
LOGIN_NONCE = "trackrelay_login"
LIMITER = web.AppKey("login_budgets", AttemptBudgets)
JINJA = web.AppKey("jinja", jinja2.Environment)


TZ_COOKIE = "tz"
_ZONE_NAME = re.compile(r"[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+){0,2}")


def _zone(name: str | None) -> ZoneInfo | None:
    if not name or len(name) > 64 or not _ZONE_NAME.fullmatch(name):
        return None
    try:
        return ZoneInfo(name)
    except (ValueError, KeyError, OSError):
        return None


def zone_for(request: web.Request, user: User | None) -> tuple[ZoneInfo, bool]:
    """The zone a page is shown in and whether the user configured it (``[[users]] time_zone``);
    otherwise the browser's, which the pages' script sends in the ``tz`` cookie; otherwise UTC."""
    configured = _zone(user.time_zone) if user is not None and user.time_zone else None
    if configured is not None:
        return configured, True
    return _zone(unquote(request.cookies.get(TZ_COOKIE) or "")) or ZoneInfo("UTC"), False


def _aware(value) -> datetime | None:
    if not value:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def exact_time(value, tz: ZoneInfo) -> str:
    t = _aware(value)
    if t is None:
        return ""
    local = t.astimezone(tz)
    return local.strftime("%Y-%m-%d %H:%M ") + (local.tzname() or tz.key)


def relative_time(value, now: datetime) -> str:
    t = _aware(value)
    if t is None:
        return ""
    secs = (now - t).total_seconds()
    if secs < 45:
        return "just now"
    if secs < 3600:
        return f"{max(1, round(secs / 60))} min ago"
    if secs < 86400:
        return f"{int(secs // 3600)} h ago"
    days = int(secs // 86400)
    return "yesterday" if days == 1 else f"{days} days ago"


@jinja2.pass_context
def _when(ctx, value) -> str:
    """The exact time in the page's zone, labelled ("2026-12-07 16:29 EST")."""
    return exact_time(value, ctx["tz"])


@jinja2.pass_context
def _ago(ctx, value) -> Markup:
    """A relative time with the exact one on hover; the script keeps both current in the browser."""
    t = _aware(value)
    if t is None:
        return Markup("")
    iso = t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    return Markup('<time datetime="{}" title="{}" data-rel>{}</time>').format(
        iso, exact_time(t, ctx["tz"]), relative_time(t, ctx["now"]))


@jinja2.pass_context
def _at(ctx, value) -> Markup:
    """The exact time as a <time> element the script shows in the browser's zone."""
    t = _aware(value)
    if t is None:
        return Markup("")
    iso = t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    return Markup('<time datetime="{}" data-abs>{}</time>').format(iso, exact_time(t, ctx["tz"]))


def _pct(rate) -> str:
    return "—" if rate is None else f"{rate * 100:.0f} %"


def make_env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["when"] = _when
    env.filters["ago"] = _ago
    env.filters["at"] = _at
    env.filters["pct"] = _pct
    env.filters["urlencode"] = lambda v: quote(str(v), safe="@")
    env.globals["reason_words"] = reason_words
    env.globals["recipient_reason_words"] = recipient_reason_words
    return env


def render(request: web.Request, template: str, status: int = 200, **context) -> web.Response:
    tz, configured = zone_for(request, context.get("user"))
    context.setdefault("tz", tz)
    context.setdefault("tz_configured", configured)
    context.setdefault("now", datetime.now(timezone.utc))
    context.setdefault("nav", "")
    html = request.app[JINJA].get_template(template).render(**context)
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8",
                        headers=_page_headers())


def _page_headers() -> dict[str, str]:
    return {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin", "Cache-Control": "no-store", "X-Frame-Options": "DENY"}


def signed_in(request: web.Request) -> tuple[User, str]:
    """The user and the CSRF token of the page's session (the routes of pages are PAGE or FORM:
    the authentication middleware found them, or sent the browser to /login)."""
    return user_of(request), csrf_of(request)


async def _checked_form(request: web.Request) -> tuple[User, dict]:
    """A state-changing POST (a FORM route: its CSRF token was checked) and its fields."""
    return user_of(request), dict(await request.post())


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
                        secure=sessions.is_https(request, ctx.trusted_proxies, ctx.config.api.public_url))
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
    return client_ip(peer_ip(request), request.headers.get("X-Forwarded-For"), ctx.trusted_proxies)


async def logout(request: web.Request) -> web.Response:
    await _checked_form(request)
    await sessions.end(request.app[CTX], request.cookies.get(sessions.COOKIE))
    resp = web.HTTPSeeOther("/login")
    resp.del_cookie(sessions.COOKIE, path="/")
    raise resp


# -- words ---------------------------------------------------------------------------------------

#: Why an open or click was not counted as a person reading, in words.
_REASONS = {
    "head_request": "machine: a HEAD request (a link checker, not a browser)",
    "scanner_agent": "link scanner: its user agent is a known scanner or HTTP library",
    "apple_privacy_proxy": "Apple Mail Privacy Protection: Apple's proxy fetched it, perhaps unread",
    "click_burst": "link scanner: several links clicked within 2 s",
    "sender_ip": "you: from your own address",
    "signed_in_ip": "you: from an address you are signed in from",
}


def reason_words(event: dict, sent_at: str | None = None) -> str:
    reason = event.get("reason")
    if reason == "scanner_window":
        verb = "clicked" if event.get("type") == "clicked" else "opened"
        t, d = _aware(event.get("at")), _aware(sent_at)
        if t is not None and d is not None:
            return f"link scanner: {verb} within {max(0, round((t - d).total_seconds()))} s of delivery"
        return f"link scanner: {verb} right after delivery"
    if reason in _REASONS:
        return _REASONS[reason]
    if reason and reason.startswith("auto_reply:"):
        return f"an automatic reply ({reason.split(':', 1)[1].strip()}): not a person's answer"
    if event.get("inferred"):
        return "a click without an earlier open: the open is inferred"
    return reason or ""


#: Words for each policy reason (``core.reasons.Reason``; X-Track and X-Log choices say what they chose).
_RECIPIENT_REASONS = {
    Reason.TRACKING_DISABLED: "tracking is off for everybody", Reason.DEFAULT_UNTRACKED: "not tracked by default",
    Reason.X_TRACK_INVALID: "X-Track header not understood",
    Reason.INTERNAL: "a colleague: neither tracked nor logged",
    Reason.OWN_ADDRESS: "one of your own addresses: neither tracked nor logged",
    Reason.DO_NOT_TRACK: "the contact asked not to be tracked", Reason.GDPR_NO_BASIS: "no legal basis to track (GDPR)",
    Reason.NEVER_LOG: "on a Never Log list", Reason.LOG_BCC: "logged: BCC to the log address",
    Reason.DEFAULT_UNLOGGED: "not logged by default",
    Reason.CREATE_CONTACTS_OFF: "logged only to an existing contact (contact creation is off)",
    Reason.SYSTEM_SENDER: "a system sender: no contact created",
}


def recipient_reason_words(code: str) -> str:
    if code.startswith("x_track:"):
        return f"X-Track: {code.split(':', 1)[1]}"
    if code.startswith("x_log:"):
        return f"X-Log: {code.split(':', 1)[1]}"
    return _RECIPIENT_REASONS.get(code, code.replace("_", " "))


def classification_words(value: str | None) -> str:
    return {"self": "you", None: ""}.get(value, value or "")


def device_of(user_agent: str | None) -> str:
    """Client and device from a user agent ("Apple Mail/iOS · iPhone"); the raw string stays on demand."""
    if not user_agent:
        return ""
    client = client_of(user_agent) or ""
    device = ""
    try:
        from ua_parser import parse
        r = parse(user_agent)
        if r.device and r.device.family not in (None, "Other", "Spider"):
            device = r.device.family
    except Exception:  # noqa: BLE001 - an unparseable agent is shown raw
        pass
    if not client and is_scanner_agent(user_agent):
        client = "scanner"
    return " · ".join(x for x in (client or "unknown client", device) if x)


def _who(request: web.Request, user: User) -> str | None:
    """Whose mail a page shows: the user's own; an admin's team (None) or one user (``?user=``)."""
    if not user.admin:
        return user.name
    wanted = request.query.get("user") or ""
    names = {u.name for u in request.app[CTX].config.users}
    return wanted if wanted in names else None


# -- pages --------------------------------------------------------------------------------------

def _feed_query(request: web.Request) -> dict:
    status = request.query.get("status") or None
    if status not in feed.FILTERS:
        status = None
    if request.query.get("tracked") in ("1", "true") and not status:
        status = "tracked"
    return {"status": status, "search": (request.query.get("q") or "").strip()[:200]}


def _feed_url(**params) -> str:
    from urllib.parse import urlencode
    return "/" + ("?" + urlencode({k: v for k, v in params.items() if v}) if any(params.values()) else "")


async def feed_page(request: web.Request) -> web.Response:
    user, csrf = signed_in(request)
    f = _feed_query(request)
    cursor = request.query.get("cursor", "")
    before = int(cursor) if cursor.isdigit() and len(cursor) < 19 else None
    async with request.app[CTX].sessionmaker() as s:
        msgs = await feed.list_messages(s, None if user.admin else user.name, before, 50, False,
                                        status=f["status"], search=f["search"] or None)
        items = await feed.feed_json(s, msgs)
    chips = [(label, _feed_url(status=key, q=f["search"]), key == f["status"]) for key, label in (
        (None, "All mail"), ("tracked", "Tracked"), ("opened", "Opened"), ("clicked", "Clicked"),
        ("replied", "Replied"), ("bounced", "Bounced"), ("not_opened", "Not opened"))]
    live = not f["status"] and not f["search"] and before is None
    export = "/export/feed.csv" + _feed_url(status=f["status"], q=f["search"])[1:]
    return render(request, "feed.html", user=user, csrf=csrf, messages=items, chips=chips, search=f["search"],
                  filter=f["status"] or "", live=live, nav="feed", export=export,
                  next=_feed_url(status=f["status"], q=f["search"], cursor=str(msgs[-1].id))
                  if len(msgs) == 50 else None)


def _cell(value) -> str:
    """A CSV cell a spreadsheet will not run: text starting with = + - @ (or tab, CR) gets a quote."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv(rows: list[list], filename: str) -> web.Response:
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf)
    for row in rows:
        w.writerow([_cell(v) for v in row])
    headers = _page_headers()
    headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return web.Response(text=buf.getvalue(), content_type="text/csv", charset="utf-8", headers=headers)


EXPORT_MAX = 10000


async def feed_csv(request: web.Request) -> web.Response:
    """The feed as CSV, one row per recipient, with the page's filters and search (times in UTC)."""
    user, _ = signed_in(request)
    f = _feed_query(request)
    rows = [["message", "accepted_at", "subject", "recipient", "name", "status", "opens", "machine_opens",
             "first_opened_at", "last_opened_at", "clicks", "links"]]
    before = None
    async with request.app[CTX].sessionmaker() as s:
        while len(rows) <= EXPORT_MAX:
            msgs = await feed.list_messages(s, None if user.admin else user.name, before, 500, False,
                                            status=f["status"], search=f["search"] or None)
            for m in await feed.feed_json(s, msgs):
                for r in m["recipients"]:
                    rows.append([m["id"], m["accepted_at"], m["subject"], r["address"], r["name"], r["status"],
                                 r["opens"], r["machine_opens"], r["first_opened_at"], r["last_opened_at"],
                                 sum(c["count"] for c in r["clicks"]), " ".join(c["url"] for c in r["clicks"])])
            if len(msgs) < 500:
                break
            before = msgs[-1].id
    return _csv(rows, "trackrelay-feed.csv")


async def contact_csv(request: web.Request) -> web.Response:
    """A contact's activity (the user's mail to them; admins: everybody's) as CSV, times in UTC."""
    user, _ = signed_in(request)
    email = request.match_info["email"].strip().lower()
    async with request.app[CTX].sessionmaker() as s:
        if await q.get_contact(s, email) is None:
            raise web.HTTPNotFound(text="no such contact")
        acts = await dashboard.contact_activity(s, email, None if user.admin else user.name, limit=EXPORT_MAX)
    rows = [["at", "activity", "message", "subject", "link", "who", "client"]]
    for a in sorted(acts, key=lambda a: _aware(a["at"]), reverse=True):
        who = classification_words(a["classification"])
        if a["classification"] in ("machine", "self"):
            who = reason_words(a, a.get("sent_at"))
        rows.append([_aware(a["at"]).isoformat().replace("+00:00", "Z"), a["type"], a["message"], a["subject"],
                     a["url"], who, a["client"]])
    return _csv(rows, "trackrelay-contact.csv")


async def message_card(request: web.Request) -> web.Response:
    """One message's card of the feed, for the script to put a new message on top."""
    user, csrf = signed_in(request)
    async with request.app[CTX].sessionmaker() as s:
        msg = await feed.get_message(s, int(request.match_info["id"]), None if user.admin else user.name)
        items = await feed.feed_json(s, [msg]) if msg else []
    if not items:
        raise web.HTTPNotFound(text="no such message")
    return render(request, "card.html", user=user, csrf=csrf, m=items[0])


async def message_page(request: web.Request) -> web.Response:
    user, csrf = signed_in(request)
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 18:
        raise web.HTTPNotFound(text="no such message")
    async with request.app[CTX].sessionmaker() as s:
        item = await feed.message_with_events(s, int(raw), None if user.admin else user.name)
    if item is None:
        raise web.HTTPNotFound(text="no such message")
    sent = {r["address"]: r.get("sent_at") for r in item["recipients"]}
    links: dict[tuple[str, str], dict] = {}
    for e in item["events"]:
        e["why"] = reason_words(e, sent.get(e["recipient"])) if e["classification"] != "human" else (
            reason_words(e) if e["inferred"] else "")
        e["who"] = classification_words(e["classification"])
        e["device"] = device_of(e["user_agent"])
        if e["type"] == "clicked" and e["url"]:
            row = links.setdefault((e["recipient"] or "", e["url"]), {"recipient": e["recipient"], "url": e["url"],
                                                                      "human": 0, "machine": 0, "you": 0})
            row[{"human": "human", "self": "you"}.get(e["classification"], "machine")] += 1
    return render(request, "message.html", user=user, csrf=csrf, m=item, events=item["events"],
                  links=sorted(links.values(), key=lambda r: (r["recipient"] or "", r["url"])), nav="feed")


async def _recipient_copy(request: web.Request) -> tuple[User, str, bytes | None, str]:
    """The copy a recipient got, made again from the spooled bytes with the copy's own token
    (what the delivery worker made, without the DKIM signature and reference header) by the
    relay's rewrite (``Context.rewrite``): the user, the address, the copy (None once the spool
    is purged) and a note."""
    user, _ = signed_in(request)
    ctx = request.app[CTX]
    async with ctx.sessionmaker() as s:
        copy = await messages.copy_source(s, int(request.match_info["id"]), int(request.match_info["rid"]),
                                          None if user.admin else user.name)
    if copy is None:
        raise web.HTTPNotFound(text="no such copy")
    raw = copy.raw
    if raw is None:
        return user, copy.address, None, "The spooled message is no longer kept (queue.keep_delivered_days)."
    if not (copy.token and (copy.track_opens or copy.track_clicks)):
        return user, copy.address, raw, "Not instrumented: the copy went out as it was."
    rewrite = ctx.rewrite
    if rewrite is None:
        return user, copy.address, raw, "The tracker cannot make the copy again here: this is the message as spooled."
    t = ctx.config.tracking
    result = await asyncio.to_thread(lambda: rewrite.render(
        rewrite.parse(raw, ctx.config.tracker.public_url),
        rewrite.Plan(token=copy.token, opens=copy.track_opens, clicks=copy.track_clicks,
                     public_url=ctx.config.tracker.public_url, keyring=ctx.keyring,
                     pixel_position=t.pixel_position, skip_url_text_links=t.skip_url_text_links)))
    note = "With its open pixel and tracked links." if result.pixel or result.links else (
        result.note or "Nothing was instrumented in this copy.")
    return user, copy.address, result.data, note


def _html_of(data: bytes) -> tuple[str | None, str | None]:
    import email
    from email import policy
    msg = email.message_from_bytes(data, policy=policy.default)
    html = msg.get_body(("html",))
    text = msg.get_body(("plain",))
    try:
        return (html.get_content() if html else None), (text.get_content() if text else None)
    except (LookupError, ValueError):
        return None, None


async def copy_page(request: web.Request) -> web.Response:
    user, csrf = signed_in(request)
    _, address, data, note = await _recipient_copy(request)
    html, text = _html_of(data) if data is not None else (None, None)
    return render(request, "copy.html", user=user, csrf=csrf, mid=int(request.match_info["id"]),
                  rid=int(request.match_info["rid"]), address=address, note=note, has_html=bool(html), text=text,
                  nav="feed")


async def copy_body(request: web.Request) -> web.Response:
    """The copy's HTML under the same sandbox as a logged body: its pixel and links do not load."""
    _, _, data, _ = await _recipient_copy(request)
    html = _html_of(data)[0] if data is not None else None
    if html is None:
        raise web.HTTPNotFound(text="no HTML in this copy")
    return web.Response(text=html, content_type="text/html", charset="utf-8", headers={
        "Content-Security-Policy": BODY_CSP, "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})


async def dashboard_page(request: web.Request) -> web.Response:
    user, csrf = signed_in(request)
    who = _who(request, user)
    tz, _ = zone_for(request, user)
    now = datetime.now(timezone.utc)
    async with request.app[CTX].sessionmaker() as s:
        periods = await dashboard.summary(s, who, now, tz)
        act = await dashboard.activity(s, who, now, tz)
        follow = await dashboard.follow_ups(s, who, now)
    return render(request, "dashboard.html", user=user, csrf=csrf, periods=periods, follow=follow,
                  daily=charts.daily_bars(act["days"]), week=charts.week_heatmap(act["week"]),
                  days=act["days"], who=who, nav="dashboard",
                  users=[u.name for u in request.app[CTX].config.users] if user.admin else [])


CONTACT_SORTS = ("name", "email", "company", "owner", "last", "basis")


async def contacts_page(request: web.Request) -> web.Response:
    user, csrf = signed_in(request)
    search = (request.query.get("q") or "").strip()[:200]
    sort = request.query.get("sort") if request.query.get("sort") in CONTACT_SORTS else "last"
    desc = request.query.get("dir", "desc" if sort == "last" else "asc") == "desc"
    async with request.app[CTX].sessionmaker() as s:
        rows = await dashboard.contacts(s, search or None, sort, desc, limit=500)
    return render(request, "contacts.html", user=user, csrf=csrf, contacts=rows, search=search, sort=sort,
                  desc=desc, nav="contacts")


async def contact_page(request: web.Request) -> web.Response:
    user, csrf = signed_in(request)
    email = request.match_info["email"].strip().lower()
    thread_key = request.query.get("thread")
    async with request.app[CTX].sessionmaker() as s:
        contact = await q.get_contact(s, email)
        if contact is None:
            raise web.HTTPNotFound(text="no such contact")
        cj = contact_json(contact, await q.company_domain(s, contact.company_pk))
        emails = await q.thread(s, thread_key) if thread_key else await q.timeline(s, contact.id)
        atts = await q.attachments_of(s, [e.id for e in emails])
        items = []
        for e in emails:
            full = await q.logged_email(s, e.id, bodies=True)
            d = logged_json(full, atts.get(e.id, []), bodies=True)
            d["has_html"] = bool(full.html)
            items.append(d)
        activities = [] if thread_key else await dashboard.contact_activity(
            s, email, None if user.admin else user.name)
    cj["name"] = feed.names_in(*(h for e in items for h in (e["from"], e["to"], e["cc"]))).get(email)
    pinned = [e for e in items if e["pinned"]]
    timeline = sorted([("email", _aware(e["date"]), e) for e in items if not e["pinned"]] +
                      [("activity", _aware(a["at"]), a) for a in activities],
                      key=lambda x: x[1] or datetime.min.replace(tzinfo=timezone.utc), reverse=True)
    # machine activity collapsed: consecutive machine rows go into one fold
    grouped: list[tuple[str, object]] = []
    for kind, _, obj in timeline:
        if kind == "activity" and obj["classification"] in ("machine", "self"):
            if grouped and grouped[-1][0] == "machine":
                grouped[-1][1].append(obj)
            else:
                grouped.append(("machine", [obj]))
        else:
            grouped.append((kind, obj))
    return render(request, "contact.html", user=user, csrf=csrf, contact=cj, emails=items, pinned=pinned,
                  timeline=grouped, thread=thread_key, back=request.rel_url.path_qs, nav="contacts")


def _config_never_log(ctx, scope: str, user: User) -> tuple[str, ...]:
    return tuple(normalise_entry(e) for e in (ctx.config.never_log.team if scope == "team" else user.never_log))


async def _never_log_view(s, ctx, scope: str, user: User) -> list[dict]:
    cfg = _config_never_log(ctx, scope, user)
    db = await q.never_log_db_entries(s, scope, "" if scope == "team" else user.name)
    return [{"entry": e, "config": True} for e in cfg] + [{"entry": e, "config": False} for e in db if e not in cfg]


async def settings_page(request: web.Request, error: str | None = None, status: int = 200,
                        new_token: tuple[str, str] | None = None) -> web.Response:
    user, csrf = signed_in(request)
    ctx = request.app[CTX]
    async with ctx.sessionmaker() as s:
        mine = await _never_log_view(s, ctx, "user", user)
        team = await _never_log_view(s, ctx, "team", user)
        tokens = await api_tokens.of_user(s, user.name)
        others = [(u, await _never_log_view(s, ctx, "user", u), len(await api_tokens.of_user(s, u.name)))
                  for u in ctx.config.users if user.admin and u.name != user.name]
    return render(request, "settings.html", status=status, user=user, csrf=csrf, mine=mine, team=team,
                  others=others, error=error, tokens=tokens, new_token=new_token, nav="settings")


async def token_create(request: web.Request) -> web.Response:
    """A new API token, shown once on the page that answers (never logged); only its hash is kept."""
    user, form = await _checked_form(request)
    name = " ".join(str(form.get("name", "")).split())[:100] or "API token"
    token = "trk_" + secrets.token_urlsafe(32)
    try:
        async with request.app[CTX].sessionmaker() as s:
            async with s.begin():
                await api_tokens.add(s, user.name, name, token_hash(token))
    except api_tokens.TooMany as e:
        return await settings_page(request, error=str(e), status=409)
    return await settings_page(request, status=201, new_token=(name, token))


async def token_revoke(request: web.Request) -> web.Response:
    user, _ = await _checked_form(request)
    async with request.app[CTX].sessionmaker() as s:
        async with s.begin():
            if not await api_tokens.revoke(s, user.name, int(request.match_info["id"])):
                raise web.HTTPNotFound(text="no such token")
    raise web.HTTPSeeOther("/settings")


async def never_log_action(request: web.Request) -> web.Response:
    user, form = await _checked_form(request)
    ctx = request.app[CTX]
    action = request.match_info["action"]
    scope = form.get("scope", "user")
    if action not in ("add", "remove") or scope not in ("user", "team"):
        raise web.HTTPNotFound(text="no such action")
    if scope == "team" and not user.admin:
        raise web.HTTPForbidden(text="the team Never Log list is changed by admins")
    entries = [e for e in re.split(r"[\s,;]+", str(form.get("entries", ""))) if e]
    try:
        async with ctx.sessionmaker() as s:
            async with s.begin():
                await q.never_log_change(s, action=action, scope=scope, user="" if scope == "team" else user.name,
                                         raw_entries=entries, config_entries=_config_never_log(ctx, scope, user))
    except q.NeverLogRefused as e:
        return await settings_page(request, error=str(e), status=400)
    raise web.HTTPSeeOther("/settings")


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
                edits.set_pinned(e, action == "pin")
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
    return download(*found)
