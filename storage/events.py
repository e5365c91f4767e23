"""Tracking events: resolving tokens, idempotent batch inserts, and the events list of the API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Event, Message, Recipient


@dataclass(frozen=True)
class TokenInfo:
    recipient_pk: int
    message_pk: int
    address: str
    user: str | None
    client_ip: str | None
    accepted_at: datetime
    sent_at: datetime | None
    never_log: bool


async def resolve_tokens(session: AsyncSession, tokens: set[str]) -> dict[str, TokenInfo]:
    if not tokens:
        return {}
    rows = await session.execute(
        select(Recipient.token, Recipient.id, Recipient.message_pk, Recipient.address, Message.user,
               Message.client_ip, Message.accepted_at, Recipient.sent_at, Recipient.never_log)
        .join(Message, Message.id == Recipient.message_pk)
        .where(Recipient.token.in_(tokens)))
    return {r[0]: TokenInfo(*r[1:]) for r in rows.all()}


async def human_history(session: AsyncSession, recipient_pks: set[int]) -> set[tuple[int, str]]:
    """(recipient, type) pairs that already have a human event: for `first` and inferred opens."""
    if not recipient_pks:
        return set()
    rows = await session.execute(
        select(Event.recipient_pk, Event.type).distinct()
        .where(Event.recipient_pk.in_(recipient_pks), Event.classification == "human",
               Event.type.in_(("opened", "clicked"))))
    return {(r[0], r[1]) for r in rows.all()}


async def insert_idempotent(session: AsyncSession, rows: list[dict]) -> None:
    """Insert events; a row whose dedupe_key is already stored is skipped (a retried batch)."""
    if not rows:
        return
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    ins = (postgresql.insert(Event) if dialect == "postgresql" else sqlite.insert(Event))
    await session.execute(ins.on_conflict_do_nothing(index_elements=["dedupe_key"]), rows)


async def list_for_user(session: AsyncSession, user: str | None, after: int, limit: int) -> list[tuple]:
    """Events after ``after`` (id order), of ``user``'s messages (None: everybody's, for admins)."""
    cond = [Event.id > after]
    if user is not None:
        cond.append(Event.user == user)
    rows = await session.execute(
        select(Event, Message.message_id, Recipient.address)
        .join(Message, Message.id == Event.message_pk)
        .outerjoin(Recipient, Recipient.id == Event.recipient_pk)
        .where(and_(*cond)).order_by(Event.id).limit(limit))
    return list(rows.all())


def event_json(event: Event, message_id: str, recipient: str | None) -> dict:
    return {
        "id": event.id,
        "type": event.type,
        "at": event.at.isoformat().replace("+00:00", "Z"),
        "message": event.message_pk,
        "message_id": message_id,
        "recipient": recipient,
        "url": event.url,
        "user_agent": event.user_agent,
        "ip": event.ip,
        "client": event.client,
        "classification": event.classification,
        "reason": event.reason,
        "first": bool(event.first),
        "inferred": bool(event.inferred),
    }
