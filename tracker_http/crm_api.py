"""CRM endpoints of the API: contacts (GET, PUT, DELETE = GDPR erase), timelines, logged emails
(details, thread, pin, unpin, DELETE), attachments and the Never Log lists.

Who may do what (SPEC §7): logged emails on timelines are visible to every user; a contact's
legal basis, do_not_track, owner and marketing flag are changed by admins and the contact's owner;
a GDPR erase is for admins; a logged email is deleted by its sender or an admin; the team Never
Log list is changed by admins.
"""

from __future__ import annotations

from aiohttp import web

from core.config import GDPR_BASES
from core.neverlog import normalise_entry
from storage import crm as q
from storage import edits
from tracker_http.shapes import contact_json, logged_json
from tracker_http.state import CTX
from tracker_http.web import download, error, id_param, json_body, json_response, user


def _email(request: web.Request) -> str:
    return request.match_info["email"].strip().lower()


async def _contact_json(s, c) -> dict:
    return contact_json(c, await q.company_domain(s, c.company_pk))


async def get_contact(request: web.Request) -> web.Response:
    async with request.app[CTX].sessionmaker() as s:
        c = await q.get_contact(s, _email(request))
        if c is None:
            return error(404, "not_found", "no such contact")
        return json_response(await _contact_json(s, c))


async def put_contact(request: web.Request) -> web.Response:
    me = user(request)
    data = await json_body(request)
    ctx = request.app[CTX]
    unknown = set(data) - edits.CONTACT_FIELDS
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
            if not me.admin and c.owner != me.name:
                return error(403, "forbidden", "only admins and the contact's owner may change it")
            await edits.change_contact(s, c, data)
            return json_response(await _contact_json(s, c))


async def delete_contact(request: web.Request) -> web.Response:
    """A GDPR erase (an ADMIN route: others are refused before it runs)."""
    async with request.app[CTX].sessionmaker() as s:
        async with s.begin():
            found = await q.erase_contact(s, _email(request))
    if not found:
        return error(404, "not_found", "no such contact")
    return web.Response(status=204)


async def get_timeline(request: web.Request) -> web.Response:
    async with request.app[CTX].sessionmaker() as s:
        c = await q.get_contact(s, _email(request))
        if c is None:
            return error(404, "not_found", "no such contact")
        emails = await q.timeline(s, c.id)
        atts = await q.attachments_of(s, [e.id for e in emails])
    return json_response({"logged_emails": [logged_json(e, atts.get(e.id, [])) for e in emails]})


def _pk(request: web.Request) -> int:
    return id_param(request, "no such logged email")


async def get_logged(request: web.Request) -> web.Response:
    async with request.app[CTX].sessionmaker() as s:
        e = await q.logged_email(s, _pk(request), bodies=True)
        if e is None:
            return error(404, "not_found", "no such logged email")
        atts = await q.attachments_of(s, [e.id])
    return json_response(logged_json(e, atts.get(e.id, []), bodies=True))


async def get_thread(request: web.Request) -> web.Response:
    async with request.app[CTX].sessionmaker() as s:
        e = await q.logged_email(s, _pk(request))
        if e is None:
            return error(404, "not_found", "no such logged email")
        emails = await q.thread(s, e.thread_key)
        atts = await q.attachments_of(s, [x.id for x in emails])
    return json_response({"thread": e.thread_key,
                          "logged_emails": [logged_json(x, atts.get(x.id, [])) for x in emails]})


async def _set_pin(request: web.Request, pinned: bool) -> web.Response:
    async with request.app[CTX].sessionmaker() as s:
        async with s.begin():
            e = await q.logged_email(s, _pk(request))
            if e is None:
                return error(404, "not_found", "no such logged email")
            edits.set_pinned(e, pinned)
        atts = await q.attachments_of(s, [e.id])
    return json_response(logged_json(e, atts.get(e.id, [])))


async def pin(request: web.Request) -> web.Response:
    return await _set_pin(request, True)


async def unpin(request: web.Request) -> web.Response:
    return await _set_pin(request, False)


async def delete_logged(request: web.Request) -> web.Response:
    me = user(request)
    async with request.app[CTX].sessionmaker() as s:
        async with s.begin():
            e = await q.logged_email(s, _pk(request))
            if e is None:
                return error(404, "not_found", "no such logged email")
            if not me.admin and e.user != me.name:
                return error(403, "forbidden", "only its sender or an admin may delete a logged email")
            await q.delete_logged_email(s, e.id)
    return web.Response(status=204)


async def get_attachment(request: web.Request) -> web.StreamResponse:
    async with request.app[CTX].sessionmaker() as s:
        found = await q.attachment_bytes(s, _pk(request))
    if found is None:
        return error(404, "not_found", "no such attachment")
    return download(*found)


def config_entries(ctx, scope: str, who) -> tuple[str, ...]:
    """The Never Log entries of the config (the team's, or user ``who``'s), normalised."""
    if scope == "team":
        return tuple(normalise_entry(e) for e in ctx.config.never_log.team)
    return tuple(normalise_entry(e) for e in who.never_log)


def _scope(request: web.Request, data: dict | None = None) -> str:
    scope = (data or {}).get("scope") or request.query.get("scope") or "user"
    if scope not in ("user", "team"):
        raise web.HTTPBadRequest(text="scope must be user or team")
    return scope


async def list_never_log(request: web.Request) -> web.Response:
    me = user(request)
    ctx = request.app[CTX]
    scope = _scope(request)
    owner = "" if scope == "team" else me.name
    async with ctx.sessionmaker() as s:
        db = await q.never_log_db_entries(s, scope, owner)
    cfg = config_entries(ctx, scope, me)
    entries = [{"entry": e, "managed_by": "config"} for e in cfg] + \
              [{"entry": e, "managed_by": "api"} for e in db if e not in cfg]
    return json_response({"scope": scope, "user": owner or None, "entries": entries})


async def _change_never_log(request: web.Request, action: str) -> web.Response:
    me = user(request)
    ctx = request.app[CTX]
    data = await json_body(request)
    scope = _scope(request, data)
    if scope == "team" and not me.admin:
        return error(403, "forbidden", "the team Never Log list is changed by admins")
    entries = data.get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        return error(400, "bad_request", "entries must be a list of strings")
    try:
        async with ctx.sessionmaker() as s:
            async with s.begin():
                changed = await q.never_log_change(s, action=action, scope=scope,
                                                   user="" if scope == "team" else me.name,
                                                   raw_entries=entries,
                                                   config_entries=config_entries(ctx, scope, me))
    except q.NeverLogRefused as e:
        return error(409 if "at most" in str(e) or "managed" in str(e) else 400, "refused", str(e))
    return json_response({"scope": scope, "added" if action == "add" else "removed": changed},
                         status=201 if action == "add" else 200)


async def add_never_log(request: web.Request) -> web.Response:
    return await _change_never_log(request, "add")


async def remove_never_log(request: web.Request) -> web.Response:
    return await _change_never_log(request, "remove")
