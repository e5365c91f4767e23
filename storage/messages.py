"""What the team's pages read of one message besides its feed: the copy a recipient got."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.feed import get_message
from storage.models import Message, Recipient


@dataclass(frozen=True)
class CopySource:
    """What a recipient's copy is made again from: its plan and the spooled bytes (None once the
    spool is purged)."""

    address: str
    token: str | None
    track_opens: bool
    track_clicks: bool
    raw: bytes | None


async def copy_source(session: AsyncSession, message_pk: int, recipient_pk: int,
                      user: str | None) -> CopySource | None:
    """The copy of recipient ``recipient_pk`` of message ``message_pk``, if ``user`` (None: any)
    sent that message; else None."""
    msg = await get_message(session, message_pk, user)
    if msg is None:
        return None
    rcpt = (await session.scalars(select(Recipient).where(Recipient.message_pk == msg.id,
                                                          Recipient.id == recipient_pk))).first()
    if rcpt is None:
        return None
    raw = (await session.execute(select(Message.raw).where(Message.id == msg.id))).scalar()
    return CopySource(rcpt.address, rcpt.token, bool(rcpt.track_opens), bool(rcpt.track_clicks), raw)
