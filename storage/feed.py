"""The activity feed: messages with, per recipient, delivery status, opens, clicks and replies."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from core.events import ENGAGEMENT, Classification, EventType, recipient_status
from storage.models import Company, Event, LoggedEmail, Message, Recipient

HUMAN = Classification.HUMAN
SELF = Classification.SELF
OPENED, CLICKED, REPLIED = EventType.OPENED, EventType.CLICKED, EventType.REPLIED


def _iso(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t else None


#: Feed filters: what the recipients' copies must show (any one recipient of the message).
FILTERS = ("tracked", OPENED, CLICKED, REPLIED, EventType.BOUNCED, "not_opened")


def _human(kind: str):
    return exists().where(Event.recipient_pk == Recipient.id, Event.type == EventType(kind),
                          Event.classification == HUMAN)


def _filter_cond(name: str):
    """A recipient condition for a feed filter (used inside EXISTS over the message's recipients)."""
    if name == "tracked":
        return Recipient.token.is_not(None)
    if name == EventType.BOUNCED:
        return Recipient.status == "bounced"
    if name == "not_opened":
        return and_(Recipient.track_opens.is_(True), Recipient.status == "sent", ~_human(OPENED))
    return _human(name)


def _like(text: str) -> str:
    return "%" + text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def list_messages(session: AsyncSession, user: str | None, before: int | None, limit: int,
                        tracked_only: bool, *, status: str | None = None, search: str | None = None,
                        after: int | None = None) -> list[Message]:
    """The user's mail (None: everybody's), newest first. ``status`` one of FILTERS; ``search``
    matches the subject, a recipient's address or the company (name or domain) of a recipient;
    ``after``: only messages newer than that id (the page's live additions)."""
    cond = [Message.kind == "mail"]
    if user is not None:
        cond.append(Message.user == user)
    if before is not None:
        cond.append(Message.id < before)
    if after is not None:
        cond.append(Message.id > after)
    if tracked_only:
        status = status or "tracked"
        if status != "tracked":
            cond.append(exists().where(Recipient.message_pk == Message.id, Recipient.token.is_not(None)))
    if status:
        cond.append(exists().where(Recipient.message_pk == Message.id, _filter_cond(status)))
    if search and search.strip():
        pat = _like(search.strip())
        company = exists().where(func.lower(Company.name).like(pat, escape="\\"),
                                 func.lower(Recipient.address).like("%@" + Company.domain))
        cond.append(or_(func.lower(Message.subject).like(pat, escape="\\"),
                        exists().where(Recipient.message_pk == Message.id,
                                       or_(func.lower(Recipient.address).like(pat, escape="\\"), company))))
    return list((await session.scalars(select(Message).where(and_(*cond)).order_by(Message.id.desc())
                                       .limit(limit))).all())


async def get_message(session: AsyncSession, pk: int, user: str | None) -> Message | None:
    cond = [Message.id == pk, Message.kind == "mail"]
    if user is not None:
        cond.append(Message.user == user)
    return (await session.scalars(select(Message).where(*cond))).first()


async def feed_json(session: AsyncSession, messages: list[Message]) -> list[dict]:
    pks = [m.id for m in messages]
    if not pks:
        return []
    rcpts = (await session.scalars(select(Recipient).where(Recipient.message_pk.in_(pks))
                                   .order_by(Recipient.id))).all()
    stats = await session.execute(
        select(Event.recipient_pk, Event.type, Event.classification, func.count(), func.min(Event.at),
               func.max(Event.at))
        .where(Event.message_pk.in_(pks), Event.type.in_(ENGAGEMENT))
        .group_by(Event.recipient_pk, Event.type, Event.classification))
    agg: dict[tuple[int, str, str | None], tuple[int, datetime, datetime]] = {
        (r, t, c): (n, lo, hi) for r, t, c, n, lo, hi in stats.all()}
    clicks = await session.execute(
        select(Event.recipient_pk, Event.url, func.count(), func.min(Event.at))
        .where(Event.message_pk.in_(pks), Event.type == CLICKED, Event.classification == HUMAN)
        .group_by(Event.recipient_pk, Event.url))
    per_url: dict[int, list[dict]] = {}
    for r, url, n, first in clicks.all():
        per_url.setdefault(r, []).append({"url": url, "count": n, "first_clicked_at": _iso(_aware(first))})
    logged_rows = (await session.execute(select(LoggedEmail.message_pk, LoggedEmail.to, LoggedEmail.cc)
                                         .where(LoggedEmail.message_pk.in_(pks)))).all()
    logged = {row[0] for row in logged_rows}
    names = names_in(*(h for row in logged_rows for h in row[1:]))
    by_msg: dict[int, list[dict]] = {}
    for r in rcpts:
        human_open = agg.get((r.id, OPENED, HUMAN))
        status = recipient_status(r.status, [k for k in ENGAGEMENT if agg.get((r.id, k, HUMAN))])
        # the sender's own opens are theirs, not a machine's: counted apart (shown as "you")
        machine = sum(v[0] for k, v in agg.items() if k[0] == r.id and k[1] == OPENED and k[2] not in (HUMAN, SELF))
        self_opens = sum(v[0] for k, v in agg.items() if k[0] == r.id and k[1] == OPENED and k[2] == SELF)
        machine_clicks = sum(v[0] for k, v in agg.items() if k[0] == r.id and k[1] == CLICKED and k[2] != HUMAN)
        by_msg.setdefault(r.message_pk, []).append({
            "id": r.id, "address": r.address, "status": str(status), "tracked_opens": bool(r.track_opens),
            "tracked_clicks": bool(r.track_clicks), "reasons": list(r.reasons or []),
            "opens": human_open[0] if human_open else 0, "machine_opens": machine,
            "self_opens": self_opens,
            "first_opened_at": _iso(_aware(human_open[1])) if human_open else None,
            "last_opened_at": _iso(_aware(human_open[2])) if human_open else None,
            "clicks": sorted(per_url.get(r.id, []), key=lambda c: c["first_clicked_at"] or ""),
            "machine_clicks": machine_clicks, "sent_at": _iso(_aware(r.sent_at)),
            "name": names.get(r.address.lower()),
        })
    return [{"id": m.id, "message_id": m.message_id, "subject": m.subject, "from": m.from_header,
             "accepted_at": _iso(m.accepted_at), "logged": m.id in logged, "recipients": by_msg.get(m.id, [])}
            for m in messages]


def names_in(*headers: str | None) -> dict[str, str]:
    """Display names by lower-cased address from address headers ("Dave Decider <dave@x>")."""
    from email.utils import getaddresses
    out: dict[str, str] = {}
    for name, addr in getaddresses([h for h in headers if h]):
        name = " ".join(name.split())
        if name and "@" in addr and name.lower() != addr.lower():
            out.setdefault(addr.lower(), name)
    return out


def _aware(t):
    from datetime import timezone
    if t is None:
        return None
    if isinstance(t, str):
        t = datetime.fromisoformat(t)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


async def message_with_events(session: AsyncSession, pk: int, user: str | None) -> dict | None:
    """One message as in the feed, with its events in commit order (None: not found, or not the
    user's). Used by the API's messages/{id} and the message page."""
    from storage import events as ev
    msg = await get_message(session, pk, user)
    if msg is None:
        return None
    (item,) = await feed_json(session, [msg])
    item["events"] = [e.to_json() for e in await ev.events_after(session, None, ev.Cursor(), 10000,
                                                                   message_pk=msg.id)]
    return item
