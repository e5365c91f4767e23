"""The activity feed: messages with, per recipient, delivery status, opens, clicks and replies."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, exists, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Event, LoggedEmail, Message, Recipient

#: A recipient's status: the furthest it got. Delivery states until a human event arrives.
_DELIVERY = {"queued": "queued", "sending": "queued", "deferred": "deferred", "sent": "sent", "bounced": "bounced"}


def _iso(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t else None


async def list_messages(session: AsyncSession, user: str | None, before: int | None, limit: int,
                        tracked_only: bool) -> list[Message]:
    cond = [Message.kind == "mail"]
    if user is not None:
        cond.append(Message.user == user)
    if before is not None:
        cond.append(Message.id < before)
    if tracked_only:
        cond.append(exists().where(Recipient.message_pk == Message.id, Recipient.token.is_not(None)))
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
        .where(Event.message_pk.in_(pks), Event.type.in_(("opened", "clicked", "replied")))
        .group_by(Event.recipient_pk, Event.type, Event.classification))
    agg: dict[tuple[int, str, str | None], tuple[int, datetime, datetime]] = {
        (r, t, c): (n, lo, hi) for r, t, c, n, lo, hi in stats.all()}
    clicks = await session.execute(
        select(Event.recipient_pk, Event.url, func.count(), func.min(Event.at))
        .where(Event.message_pk.in_(pks), Event.type == "clicked", Event.classification == "human")
        .group_by(Event.recipient_pk, Event.url))
    per_url: dict[int, list[dict]] = {}
    for r, url, n, first in clicks.all():
        per_url.setdefault(r, []).append({"url": url, "count": n, "first_clicked_at": _iso(_aware(first))})
    logged = set((await session.scalars(select(LoggedEmail.message_pk).where(LoggedEmail.message_pk.in_(pks)))).all())
    by_msg: dict[int, list[dict]] = {}
    for r in rcpts:
        human_open = agg.get((r.id, "opened", "human"))
        status = _DELIVERY.get(r.status, r.status)
        if agg.get((r.id, "replied", "human")):
            status = "replied"
        elif agg.get((r.id, "clicked", "human")):
            status = "clicked"
        elif human_open:
            status = "opened"
        machine = sum(v[0] for k, v in agg.items() if k[0] == r.id and k[1] == "opened" and k[2] != "human")
        by_msg.setdefault(r.message_pk, []).append({
            "address": r.address, "status": status, "tracked_opens": bool(r.track_opens),
            "tracked_clicks": bool(r.track_clicks), "reasons": list(r.reasons or []),
            "opens": human_open[0] if human_open else 0, "machine_opens": machine,
            "first_opened_at": _iso(_aware(human_open[1])) if human_open else None,
            "last_opened_at": _iso(_aware(human_open[2])) if human_open else None,
            "clicks": sorted(per_url.get(r.id, []), key=lambda c: c["first_clicked_at"] or ""),
        })
    return [{"id": m.id, "message_id": m.message_id, "subject": m.subject, "from": m.from_header,
             "accepted_at": _iso(m.accepted_at), "logged": m.id in logged, "recipients": by_msg.get(m.id, [])}
            for m in messages]


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
    rows = await ev.list_after(session, None, ev.Cursor(), 10000, message_pk=msg.id)
    item["events"] = [ev.event_json(e, mid, rcpt) for e, mid, rcpt in rows]
    return item
