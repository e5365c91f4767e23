"""What proved an incoming email logged by the inbound listener to be about our mail (table
``inbound_proofs``, one row per logged incoming email; migration 0007, on ``storage.models.Base``).

Anyone who knows a user's log key can send to it, so an incoming email on a timeline says how far
it can be trusted:

- ``reply``: its In-Reply-To/References name one of that user's messages, and its sender was one
  of that message's recipients (``message_pk``);
- ``thread``: it names one of that user's messages, but its sender was not a recipient of it;
- ``ref``: it carries the signed reference (``X-Trackrelay-Ref``) of one of that user's copies;
- ``none``: nothing but the log address (forwarded or BCC'd by the user — or sent by whoever
  knows the key). Such mail never changes an event or a copy's state.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage.models import Base, UTCDateTime, utcnow

KINDS = ("reply", "thread", "ref", "none")


class InboundProof(Base):
    __tablename__ = "inbound_proofs"

    logged_pk: Mapped[int] = mapped_column(ForeignKey("logged_emails.id", ondelete="CASCADE"), primary_key=True,
                                           autoincrement=False)
    #: reply | thread | ref | none
    proof: Mapped[str] = mapped_column(String(8))
    #: The message of ours it proved to be about (NULL for ``none``, or once that message is gone).
    message_pk: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


async def record(session: AsyncSession, logged_pk: int, proof: str, message_pk: int | None) -> None:
    assert proof in KINDS, proof
    session.add(InboundProof(logged_pk=logged_pk, proof=proof, message_pk=message_pk, created_at=utcnow()))
    await session.flush()


async def proofs_of(session: AsyncSession, logged_pks: list[int]) -> dict[int, tuple[str, int | None]]:
    """logged email id -> (proof, message_pk), for the incoming ones that have a row."""
    if not logged_pks:
        return {}
    rows = await session.execute(select(InboundProof.logged_pk, InboundProof.proof, InboundProof.message_pk)
                                 .where(InboundProof.logged_pk.in_(logged_pks)))
    return {pk: (p, m) for pk, p, m in rows.all()}
