"""The inbound listener's queries (``relay.inbound``): finding the copies an incoming mail proves
it is about, and marking those a bounce proves failed.

Only copies of the addressed users' own mail (``kind = 'mail'``) are ever found: whoever knows a
log key can send anything to it, so it must not reach anyone else's messages."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import NamedTuple

from sqlalchemy import Select, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Message, Recipient

#: Message-IDs looked up for one incoming mail at most (its In-Reply-To and the first References).
MAX_MESSAGE_IDS = 100


class Copy(NamedTuple):
    """One recipient's copy of one of our messages, as the inbound listener needs it."""

    id: int
    message_pk: int
    address: str
    never_log: bool
    #: The user whose message it is.
    user: str | None


_COPY_COLUMNS = (Recipient.id, Recipient.message_pk, Recipient.address, Recipient.never_log, Message.user)


def message_id_forms(ids: Iterable[str]) -> list[str]:
    """Message-IDs as a stored Message-ID may be written: with angle brackets and without."""
    out: list[str] = []
    for i in ids:
        bare = i.strip().strip("<>").strip()
        if bare:
            out += [f"<{bare}>", bare]
    return list(dict.fromkeys(out))


def _copies(where) -> Select:
    return select(*_COPY_COLUMNS).join(Message, Message.id == Recipient.message_pk).where(*where)


async def copies_of_messages(session: AsyncSession, message_ids: list[str], users: Collection[str]) -> list[Copy]:
    """The copies of these users' messages whose Message-ID is one of ``message_ids`` (the first
    ``MAX_MESSAGE_IDS``)."""
    if not message_ids or not users:
        return []
    rows = await session.execute(_copies((Message.message_id.in_(message_id_forms(message_ids[:MAX_MESSAGE_IDS])),
                                          Message.kind == "mail", Message.user.in_(list(users)))))
    return [Copy(*r) for r in rows.all()]


async def copies_by_id(session: AsyncSession, copy_ids: Collection[int], users: Collection[str]) -> list[Copy]:
    """These copies (by recipient id: verified references), those of these users' messages only."""
    if not copy_ids or not users:
        return []
    rows = await session.execute(_copies((Recipient.id.in_(sorted(copy_ids)), Message.kind == "mail",
                                          Message.user.in_(list(users)))))
    return [Copy(*r) for r in rows.all()]


async def mark_bounced(session: AsyncSession, copy_ids: Collection[int]) -> None:
    """A bounce proved these copies failed for good: their status is ``bounced``."""
    if copy_ids:
        await session.execute(update(Recipient).where(Recipient.id.in_(sorted(copy_ids))).values(status="bounced")
                              .execution_options(synchronize_session=False))
