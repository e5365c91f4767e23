"""The JSON shapes of the API (SPEC §7): an error, a contact, a logged email.

Pure functions of what storage returned: no request, no session, no query. An event is shaped
by ``core.events.Event.to_json`` (the API, the stream and the webhooks show it alike); a message
and its recipients by ``storage.feed``, which reads them in the shape the feed shows.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from storage.models import Contact, LoggedEmail


def dumps(data: Any) -> str:
    """JSON as every answer of the API writes it: UTF-8 text, not ``\\u`` escapes."""
    return json.dumps(data, ensure_ascii=False)


def iso(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t else None


def error_json(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def contact_json(c: Contact, company: str | None) -> dict:
    """A contact; ``company`` is its company's domain (``storage.crm.company_domain``)."""
    return {"email": c.email, "owner": c.owner, "marketing": bool(c.marketing), "legal_basis": c.legal_basis,
            "do_not_track": bool(c.do_not_track), "company": company,
            "last_open_at": iso(c.last_open_at), "last_click_at": iso(c.last_click_at),
            "last_engagement_at": iso(c.last_engagement_at)}


def logged_json(e: LoggedEmail, attachments: list[tuple], bodies: bool = False) -> dict:
    """A logged email; ``attachments`` its (id, filename, content type, size); ``bodies``: with
    its text and HTML."""
    out = {"id": e.id, "direction": e.direction, "subject": e.subject, "from": e.from_, "to": e.to, "cc": e.cc,
           "date": iso(e.date), "pinned": bool(e.pinned), "thread": e.thread_key, "message_id": e.message_id,
           "sender": e.user,
           "attachments": [{"id": aid, "filename": fn, "content_type": ct, "size": size}
                           for aid, fn, ct, size in attachments],
           "omitted_attachments": list(e.omitted_attachments or [])}
    if bodies:
        out["text"], out["html"] = e.text, e.html
    return out
