"""Sign-in sessions of the pages, kept server-side so that they can be ended: by logout, by a
password change (``password_tag`` no longer matches) and by removing the user from the config.

The cookie carries a random token; the table keeps only its SHA-256 (``id``), so a copy of the
database signs nobody in. Defined on ``storage.models.Base``; built by migration 0006.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, String, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage.models import Base, UTCDateTime, utcnow


class PageSession(Base):
    __tablename__ = "sessions"
    __table_args__ = (Index("ix_sessions_user", "user"),)

    #: SHA-256 (hex) of the cookie's random token.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user: Mapped[str] = mapped_column(String(200))
    #: A digest of the user's password hash when the session began: a new password ends it.
    password_tag: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


async def add(s: AsyncSession, sid: str, user: str, password_tag: str, now: datetime) -> None:
    s.add(PageSession(id=sid, user=user, password_tag=password_tag, created_at=now, last_seen_at=now))


async def get(s: AsyncSession, sid: str) -> PageSession | None:
    return (await s.execute(select(PageSession).where(PageSession.id == sid))).scalar_one_or_none()


async def touch(s: AsyncSession, sid: str, now: datetime) -> None:
    await s.execute(update(PageSession).where(PageSession.id == sid).values(last_seen_at=now))


async def remove(s: AsyncSession, sid: str) -> None:
    await s.execute(delete(PageSession).where(PageSession.id == sid))


async def remove_user(s: AsyncSession, user: str) -> int:
    return (await s.execute(delete(PageSession).where(PageSession.user == user))).rowcount or 0


async def remove_except(s: AsyncSession, keep: dict[str, str]) -> int:
    """End every session whose user is not in ``keep`` (user -> password tag) or whose password
    tag differs: what a reloaded config removed or re-passworded."""
    rows = (await s.execute(select(PageSession.id, PageSession.user, PageSession.password_tag))).all()
    gone = [sid for sid, user, tag in rows if keep.get(user) != tag]
    for i in range(0, len(gone), 500):
        await s.execute(delete(PageSession).where(PageSession.id.in_(gone[i:i + 500])))
    return len(gone)


async def purge(s: AsyncSession, idle_before: datetime, created_before: datetime) -> None:
    await s.execute(delete(PageSession).where(or_(PageSession.last_seen_at < idle_before,
                                                  PageSession.created_at < created_before)))
