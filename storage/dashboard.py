"""The home dashboard's figures: per period, messages sent and the recipients' human engagement;
human opens and clicks per day and by hour of the week; the messages that need a follow-up.

Definitions (the page says them too):

- *sent*: messages accepted in the period (by their acceptance time);
- *open rate*: of the delivered copies whose opens were tracked, the share with a human open;
- *click rate*: of the delivered copies whose clicks were tracked, the share with a human click;
- *reply rate*: of the delivered copies, the share with a reply;
- *bounces*: copies that bounced.

Engagement is counted for the copies of the period's messages, whenever it came.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from sqlalchemy import and_, exists, select
from sqlalchemy.ext.asyncio import AsyncSession

from core.events import Classification, EventType
from storage.models import Event, Message, Recipient

HUMAN = Classification.HUMAN
OPENED, CLICKED, REPLIED = EventType.OPENED, EventType.CLICKED, EventType.REPLIED

FOLLOW_UP_OPENS = 3
FOLLOW_UP_UNOPENED_DAYS = 3


def _human(kind: EventType):
    return exists().where(Event.recipient_pk == Recipient.id, Event.type == kind, Event.classification == HUMAN)


def _replied():
    return exists().where(Event.recipient_pk == Recipient.id, Event.type == REPLIED,
                          Event.classification == Classification.HUMAN)  # an auto-reply is no reply


@dataclass
class Figures:
    messages: int = 0
    delivered: int = 0
    open_base: int = 0
    opened: int = 0
    click_base: int = 0
    clicked: int = 0
    replied: int = 0
    bounced: int = 0
    _msgs: set = field(default_factory=set, repr=False)

    @staticmethod
    def rate(n: int, base: int) -> float | None:
        return n / base if base else None

    @property
    def open_rate(self) -> float | None:
        return self.rate(self.opened, self.open_base)

    @property
    def click_rate(self) -> float | None:
        return self.rate(self.clicked, self.click_base)

    @property
    def reply_rate(self) -> float | None:
        return self.rate(self.replied, self.delivered)

    def as_dict(self) -> dict:
        return {"messages": self.messages, "delivered": self.delivered, "opened": self.opened,
                "open_base": self.open_base, "clicked": self.clicked, "click_base": self.click_base,
                "replied": self.replied, "bounced": self.bounced, "open_rate": self.open_rate,
                "click_rate": self.click_rate, "reply_rate": self.reply_rate}


def periods(now: datetime, tz: ZoneInfo) -> list[tuple[str, datetime, datetime, datetime]]:
    """(label, start, end, previous start) of today (local midnight on), 7 and 30 days."""
    local = now.astimezone(tz)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0).astimezone(timezone.utc)
    yesterday = (local.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1))
    # the local day before (23 or 25 hours long across a DST change)
    yesterday = datetime(yesterday.year, yesterday.month, yesterday.day, tzinfo=tz).astimezone(timezone.utc)
    return [("Today", midnight, now, yesterday),
            ("7 days", now - timedelta(days=7), now, now - timedelta(days=14)),
            ("30 days", now - timedelta(days=30), now, now - timedelta(days=60))]


async def _copies(session: AsyncSession, user: str | None, since: datetime):
    cond = [Message.kind == "mail", Message.accepted_at >= since]
    if user is not None:
        cond.append(Message.user == user)
    rows = await session.execute(
        select(Message.id, Message.accepted_at, Recipient.status, Recipient.track_opens, Recipient.track_clicks,
               _human(OPENED), _human(CLICKED), _replied())
        .join(Recipient, Recipient.message_pk == Message.id).where(and_(*cond)))
    return rows.all()


async def summary(session: AsyncSession, user: str | None, now: datetime, tz: ZoneInfo) -> list[dict]:
    """Per period: its figures and the previous period's."""
    spans = periods(now, tz)
    earliest = min(p[3] for p in spans)
    rows = await _copies(session, user, earliest)
    out = []
    for label, start, end, prev in spans:
        cur, before = Figures(), Figures()
        for mid, at, status, t_open, t_click, opened, clicked, replied in rows:
            at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
            f = cur if start <= at < end or (at == end) else before if prev <= at < start else None
            if f is None:
                continue
            f._msgs.add(mid)
            if status == "bounced":
                f.bounced += 1
            if status != "sent":
                continue
            f.delivered += 1
            f.replied += bool(replied)
            if t_open:
                f.open_base += 1
                f.opened += bool(opened)
            if t_click:
                f.click_base += 1
                f.clicked += bool(clicked)
        for f in (cur, before):
            f.messages = len(f._msgs)
        out.append({"label": label, "current": cur, "previous": before})
    return out


async def activity(session: AsyncSession, user: str | None, now: datetime, tz: ZoneInfo,
                   days: int = 30) -> dict:
    """Human opens and clicks per local day (the last ``days``) and per (weekday, hour)."""
    since = now - timedelta(days=days)
    cond = [Event.type.in_((OPENED, CLICKED)), Event.classification == HUMAN, Event.at >= since]
    if user is not None:
        cond.append(Event.user == user)
    rows = (await session.execute(select(Event.type, Event.at).where(and_(*cond)))).all()
    today = now.astimezone(tz).date()
    day_list = [today - timedelta(days=i) for i in range(days - 1, -1, -1)]
    per_day = {d: {OPENED: 0, CLICKED: 0} for d in day_list}
    week = [[0] * 24 for _ in range(7)]
    for kind, at in rows:
        at = (at if at.tzinfo else at.replace(tzinfo=timezone.utc)).astimezone(tz)
        if at.date() in per_day:
            per_day[at.date()][kind] += 1
        week[at.weekday()][at.hour] += 1
    return {"days": [(d, v[OPENED], v[CLICKED]) for d, v in per_day.items()], "week": week}


async def follow_ups(session: AsyncSession, user: str | None, now: datetime, limit: int = 20) -> list[dict]:
    """Copies to follow up, newest message first: opened several times, clicked, or tracked,
    delivered and not opened after 3 days; none that has a reply. Within the last 30 days."""
    cond = [Message.kind == "mail", Message.accepted_at >= now - timedelta(days=30), Recipient.status == "sent",
            ~_replied()]
    if user is not None:
        cond.append(Message.user == user)
    opens = (select(Event.recipient_pk.label("rpk"), Event.type.label("type"))
             .where(Event.classification == HUMAN, Event.type.in_((OPENED, CLICKED))).subquery())
    from sqlalchemy import func
    n_open = select(func.count()).where(opens.c.rpk == Recipient.id, opens.c.type == OPENED).scalar_subquery()
    n_click = select(func.count()).where(opens.c.rpk == Recipient.id, opens.c.type == CLICKED).scalar_subquery()
    rows = (await session.execute(
        select(Message.id, Message.subject, Message.accepted_at, Recipient.address, Recipient.track_opens,
               Recipient.sent_at, n_open, n_click)
        .join(Recipient, Recipient.message_pk == Message.id).where(and_(*cond))
        .order_by(Message.id.desc(), Recipient.id))).all()
    out = []
    stale = now - timedelta(days=FOLLOW_UP_UNOPENED_DAYS)
    for mid, subject, accepted, address, t_open, sent_at, opened, clicked in rows:
        sent_at = sent_at if sent_at is None or sent_at.tzinfo else sent_at.replace(tzinfo=timezone.utc)
        if clicked:
            why = f"clicked {clicked} time{'s' if clicked != 1 else ''}"
        elif opened >= FOLLOW_UP_OPENS:
            why = f"opened {opened} times"
        elif t_open and not opened and sent_at is not None and sent_at < stale:
            why = f"not opened after {FOLLOW_UP_UNOPENED_DAYS} days"
        else:
            continue
        out.append({"message": mid, "subject": subject, "accepted_at": accepted, "recipient": address,
                    "why": why, "opens": opened, "clicks": clicked})
        if len(out) == limit:
            break
    return out


# -- contacts ---------------------------------------------------------------------------------------

async def contacts(session: AsyncSession, search: str | None, sort: str, desc: bool, limit: int = 500,
                   scan: int = 20000) -> list[dict]:
    """Contacts with their name (from the address headers of their logged emails), company,
    owner, last engagement and legal basis; ``search`` matches name, address or company."""
    from storage.feed import names_in
    from storage.models import Company, Contact, LoggedAssociation, LoggedEmail
    rows = (await session.execute(
        select(Contact.id, Contact.email, Contact.owner, Contact.last_engagement_at, Contact.legal_basis,
               Contact.do_not_track, Company.domain, Company.name)
        .outerjoin(Company, Company.id == Contact.company_pk).order_by(Contact.id).limit(scan))).all()
    heads = (await session.execute(
        select(LoggedAssociation.target_pk, LoggedEmail.from_, LoggedEmail.to, LoggedEmail.cc)
        .join(LoggedEmail, LoggedEmail.id == LoggedAssociation.logged_pk)
        .where(LoggedAssociation.kind == "contact"))).all()
    by_contact: dict[int, list[str]] = {}
    for pk, *h in heads:
        by_contact.setdefault(pk, []).extend(x for x in h if x)
    out = []
    needle = (search or "").strip().lower()
    for pk, email, owner, last, basis, dnt, domain, cname in rows:
        name = names_in(*by_contact.get(pk, [])).get(email.lower())
        company = cname or domain
        if needle and not any(needle in (x or "").lower() for x in (name, email, company, domain)):
            continue
        out.append({"email": email, "name": name, "owner": owner, "company": company,
                    "last_engagement_at": last, "legal_basis": basis, "do_not_track": bool(dnt)})
    floor = datetime.min.replace(tzinfo=timezone.utc)
    key = {"name": lambda c: ((c["name"] or "~").lower(), c["email"]), "email": lambda c: c["email"],
           "company": lambda c: ((c["company"] or "~").lower(), c["email"]),
           "owner": lambda c: ((c["owner"] or "~").lower(), c["email"]),
           "basis": lambda c: (c["legal_basis"] or "~", c["email"]),
           "last": lambda c: (c["last_engagement_at"] or floor, c["email"])}[sort]
    out.sort(key=key, reverse=desc)
    return out[:limit]


async def contact_activity(session: AsyncSession, email: str, user: str | None, limit: int = 1000) -> list[dict]:
    """Every message sent to ``email`` (by ``user``; None: anybody) and its copy's events:
    sent, opened, clicked (with the link), replied, bounced — newest first."""
    cond = [Message.kind == "mail", func_lower(Recipient.address) == email.lower()]
    if user is not None:
        cond.append(Message.user == user)
    copies = (await session.execute(
        select(Recipient.id, Message.id, Message.subject, Message.user, Recipient.sent_at, Message.accepted_at)
        .join(Message, Message.id == Recipient.message_pk).where(and_(*cond))
        .order_by(Message.id.desc()).limit(limit))).all()
    if not copies:
        return []
    info = {rid: (mid, subject, sender, sent_at) for rid, mid, subject, sender, sent_at, _ in copies}
    out = [{"type": str(EventType.SENT), "at": sent_at or accepted, "message": mid, "subject": subject, "sender": sender,
            "url": None, "classification": None, "reason": None, "inferred": False, "client": None}
           for rid, mid, subject, sender, sent_at, accepted in copies]
    events = (await session.execute(
        select(Event.recipient_pk, Event.type, Event.at, Event.url, Event.classification, Event.reason,
               Event.inferred, Event.client)
        .where(Event.recipient_pk.in_(list(info)), Event.type.in_((OPENED, CLICKED, REPLIED, EventType.BOUNCED)))
        .order_by(Event.id.desc()).limit(limit))).all()
    for rid, kind, at, url, cls, reason, inferred, client in events:
        mid, subject, sender, sent_at = info[rid]
        out.append({"type": kind, "at": at, "message": mid, "subject": subject, "sender": sender, "url": url,
                    "classification": cls, "reason": reason, "inferred": bool(inferred), "client": client,
                    "sent_at": sent_at})
    return out


def func_lower(col):
    from sqlalchemy import func
    return func.lower(col)
