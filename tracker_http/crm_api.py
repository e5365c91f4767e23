"""CRM endpoints of the API: contacts (GET, PUT, DELETE = GDPR erase), timelines, logged emails
(details, thread, pin, unpin, DELETE), attachments and the Never Log lists.

Who may do what (SPEC §7): logged emails on timelines are visible to every user; a contact's
legal basis, do_not_track, owner and marketing flag are changed by admins and the contact's owner;
a GDPR erase is for admins; a logged email is deleted by its sender or an admin; the team Never
Log list is changed by admins.
"""

from __future__ import annotations

import json
from datetime import datetime

from urllib.parse import quote

from aiohttp import web

from storage import crm as q
from storage.models import LoggedEmail
from tracker_http.api import authenticate, error
from tracker_http.state import CTX
from core.config import GDPR_BASES
from core.neverlog import normalise_entry


def _iso(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t else None


def _json(data, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, ensure_ascii=False))


async def _body(request: web.Request) -> dict:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object")
    return data


async def contact_json(session, c) -> dict:
    return {"email": c.email, "owner": c.owner, "marketing": bool(c.marketing), "legal_basis": c.legal_basis,
            "do_not_track": bool(c.do_not_track), "company": await q.company_domain(session, c.company_pk),
            "last_open_at": _iso(c.last_open_at), "last_click_at": _iso(c.last_click_at),
            "last_engagement_at": _iso(c.last_engagement_at)}


def logged_json(e: LoggedEmail, attachments: list[tuple], bodies: bool = False) -> dict:
    out = {"id": e.id, "direction": e.direction, "subject": e.subject, "from": e.from_, "to": e.to, "cc": e.cc,
           "date": _iso(e.date), "pinned": bool(e.pinned), "thread": e.thread_key, "message_id": e.message_id,
           "sender": e.user,
           "attachments": [{"id": aid, "filename": fn, "content_type": ct, "size": size}
                           for aid, fn, ct, size in attachments],
           "omitted_attachments": list(e.omitted_attachments or [])}
    if bodies:
        out["text"], out["html"] = e.text, e.html
    return out


def _email(request: web.Request) -> str:
    return request.match_info["email"].strip().lower()


async def get_contact(request: web.Request) -> web.Response:
    authenticate(request)
    async with request.app[CTX].sessionmaker() as s:
        c = await q.get_contact(s, _email(request))
        if c is None:
            return error(404, "not_found", "no such contact")
        return _json(await contact_json(s, c))


async def put_contact(request: web.Request) -> web.Response:
    user = authenticate(request)
    data = await _body(request)
    ctx = request.app[CTX]
    unknown = set(data) - {"legal_basis", "do_not_track", "owner", "marketing"}
    if unknown:
        return error(400, "bad_request", f"unknown field {sorted(unknown)[0]!r}")
    if "legal_basis" in data and data["legal_basis"] is not None and data["legal_basis"] not in GDPR_BASES:
        return error(400, "bad_request", f"legal_basis must be one of {', '.join(GDPR_BASES)} or null")
    for flag in ("do_not_track", "marketing"):
        if flag in data and not isinstance(data[flag], bool):
            return error(400, "bad_request", f"{flag} must be true or false")
    if "owner" in data and data["owner"] is not None and ctx.config.user(str(data["owner"])) is None:
        return error(400, "bad_request", "owner must be a user name")
    async with ctx.sessionmaker() as s:
        async with s.begin():
            c = await q.get_contact(s, _email(request))
            if c is None:
                return error(404, "not_found", "no such contact")
            if not user.admin and c.owner != user.name:
                return error(403, "forbidden", "only admins and the contact's owner may change it")
            for k, v in data.items():
                setattr(c, k, v)
            await s.flush()
            return _json(await contact_json(s, c))


async def delete_contact(request: web.Request) -> web.Response:
    user = authenticate(request)
    if not user.admin:
        return error(403, "forbidden", "a GDPR erase is for admins")
    async with request.app[CTX].sessionmaker() as s:
        async with s.begin():
            found = await q.erase_contact(s, _email(request))
    if not found:
        return error(404, "not_found", "no such contact")
    return web.Response(status=204)


async def get_timeline(request: web.Request) -> web.Response:
    authenticate(request)
    async with request.app[CTX].sessionmaker() as s:
        c = await q.get_contact(s, _email(request))
        if c is None:
            return error(404, "not_found", "no such contact")
        emails = await q.timeline(s, c.id)
        atts = await q.attachments_of(s, [e.id for e in emails])
    return _json({"logged_emails": [logged_json(e, atts.get(e.id, [])) for e in emails]})


def _pk(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 18:
        raise web.HTTPNotFound(text="no such logged email")
    return int(raw)


async def get_logged(request: web.Request) -> web.Response:
    authenticate(request)
    async with request.app[CTX].sessionmaker() as s:
        e = await q.logged_email(s, _pk(request), bodies=True)
        if e is None:
            return error(404, "not_found", "no such logged email")
        atts = await q.attachments_of(s, [e.id])
    return _json(logged_json(e, atts.get(e.id, []), bodies=True))


async def get_thread(request: web.Request) -> web.Response:
    authenticate(request)
    async with request.app[CTX].sessionmaker() as s:
        e = await q.logged_email(s, _pk(request))
        if e is None:
            return error(404, "not_found", "no such logged email")
        emails = await q.thread(s, e.thread_key)
        atts = await q.attachments_of(s, [x.id for x in emails])
    return _json({"thread": e.thread_key, "logged_emails": [logged_json(x, atts.get(x.id, [])) for x in emails]})


async def _set_pin(request: web.Request, pinned: bool) -> web.Response:
    authenticate(request)
    async with request.app[CTX].sessionmaker() as s:
        async with s.begin():
            e = await q.logged_email(s, _pk(request))
            if e is None:
                return error(404, "not_found", "no such logged email")
            e.pinned = pinned
        atts = await q.attachments_of(s, [e.id])
    return _json(logged_json(e, atts.get(e.id, [])))


async def pin(request: web.Request) -> web.Response:
    return await _set_pin(request, True)


async def unpin(request: web.Request) -> web.Response:
    return await _set_pin(request, False)


async def delete_logged(request: web.Request) -> web.Response:
    user = authenticate(request)
    async with request.app[CTX].sessionmaker() as s:
        async with s.begin():
            e = await q.logged_email(s, _pk(request))
            if e is None:
                return error(404, "not_found", "no such logged email")
            if not user.admin and e.user != user.name:
                return error(403, "forbidden", "only its sender or an admin may delete a logged email")
            await q.delete_logged_email(s, e.id)
    return web.Response(status=204)


async def get_attachment(request: web.Request) -> web.StreamResponse:
    authenticate(request)
    async with request.app[CTX].sessionmaker() as s:
        found = await q.attachment_bytes(s, _pk(request))
    if found is None:
        return error(404, "not_found", "no such attachment")
    return attachment_response(*found)


def attachment_response(filename: str, _content_type: str, data: bytes) -> web.Response:
    """Always a download, never rendered: octet-stream, attachment, nosniff, sandboxed."""
    safe = "".join(c if c.isalnum() or c in "._- " else "_" for c in filename)[:200] or "attachment"
    return web.Response(body=data, headers={
        "Content-Type": "application/octet-stream",
        "Content-Disposition": f"attachment; filename=\"{safe}\"; filename*=UTF-8''{quote(filename)}",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
    })


def _config_entries(ctx, scope: str, user) -> tuple[str, ...]:
    if scope == "team":
        return tuple(normalise_entry(e) for e in ctx.config.never_log.team)
    return tuple(normalise_entry(e) for e in user.never_log)


def _scope(request: web.Request, data: dict | None = None) -> str:
    scope = (data or {}).get("scope") or request.query.get("scope") or "user"
    if scope not in ("user", "team"):
        raise web.HTTPBadRequest(text="scope must be user or team")
    return scope


async def list_never_log(request: web.Request) -> web.Response:
    user = authenticate(request)
    ctx = request.app[CTX]
    scope = _scope(request)
    owner = "" if scope == "team" else user.name
    async with ctx.sessionmaker() as s:
        db = await q.never_log_db_entries(s, scope, owner)
    cfg = _config_entries(ctx, scope, user)
    entries = [{"entry": e, "managed_by": "config"} for e in cfg] + \
              [{"entry": e, "managed_by": "api"} for e in db if e not in cfg]
    return _json({"scope": scope, "user": owner or None, "entries": entries})


async def _change_never_log(request: web.Request, action: str) -> web.Response:
    user = authenticate(request)
    ctx = request.app[CTX]
    data = await _body(request)
    scope = _scope(request, data)
    if scope == "team" and not user.admin:
        return error(403, "forbidden", "the team Never Log list is changed by admins")
    entries = data.get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        return error(400, "bad_request", "entries must be a list of strings")
    try:
        async with ctx.sessionmaker() as s:
            async with s.begin():
                changed = await q.never_log_change(s, action=action, scope=scope,
                                                   user="" if scope == "team" else user.name,
                                                   raw_entries=entries,
                                                   config_entries=_config_entries(ctx, scope, user))
    except q.NeverLogRefused as e:
        return error(409 if "at most" in str(e) or "managed" in str(e) else 400, "refused", str(e))
    return _json({"scope": scope, "added" if action == "add" else "removed": changed},
                 status=201 if action == "add" else 200)


async def add_never_log(request: web.Request) -> web.Response:
    return await _change_never_log(request, "add")


async def remove_never_log(request: web.Request) -> web.Response:
    return await _change_never_log(request, "remove")


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/contacts/{email}", get_contact)
    r.add_put("/api/v1/contacts/{email}", put_contact)
    r.add_delete("/api/v1/contacts/{email}", delete_contact)
    r.add_get("/api/v1/contacts/{email}/timeline", get_timeline)
    r.add_get("/api/v1/logged-emails/{id}", get_logged)
    r.add_delete("/api/v1/logged-emails/{id}", delete_logged)
    r.add_get("/api/v1/logged-emails/{id}/thread", get_thread)
    r.add_post("/api/v1/logged-emails/{id}/pin", pin)
    r.add_post("/api/v1/logged-emails/{id}/unpin", unpin)
    r.add_get("/api/v1/attachments/{id}", get_attachment)
    r.add_get("/api/v1/never-log", list_never_log)
    r.add_post("/api/v1/never-log", add_never_log)
    r.add_delete("/api/v1/never-log", remove_never_log)
