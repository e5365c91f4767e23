"""API tokens made in the settings page, beside the config's ``[[users]] api_token_hash``.

Only the token's SHA-256 (``sha256:<hex>``, as ``trackrelay new-token`` prints for the config) is
stored: a copy of the database authenticates nobody. Defined on ``storage.models.Base``; built by
migration 0008. A revoked token is deleted: the next request with it is refused.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, String, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage.models import Base, BigId, UTCDateTime, utcnow

MAX_PER_USER = 20


class ApiToken(Base):
    __tablename__ = "api_tokens"
    __table_args__ = (Index("ix_api_tokens_user", "user"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user: Mapped[str] = mapped_column(String(200))
    #: What the user called it ("CRM sync").
    name: Mapped[str] = mapped_column(String(100), default="")
    token_hash: Mapped[str] = mapped_column(String(71), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TooMany(Exception):
    pass


async def add(s: AsyncSession, user: str, name: str, digest: str) -> ApiToken:
    have = (await s.execute(select(func.count()).select_from(ApiToken).where(ApiToken.user == user))).scalar()
    if have >= MAX_PER_USER:
        raise TooMany(f"at most {MAX_PER_USER} tokens per user: revoke one first")
    row = ApiToken(user=user, name=name, token_hash=digest, created_at=utcnow())
    s.add(row)
    await s.flush()
    return row


async def of_user(s: AsyncSession, user: str) -> list[ApiToken]:
    return list((await s.scalars(select(ApiToken).where(ApiToken.user == user).order_by(ApiToken.id))).all())


async def user_of(s: AsyncSession, digest: str) -> str | None:
    return (await s.execute(select(ApiToken.user).where(ApiToken.token_hash == digest))).scalar()


async def revoke(s: AsyncSession, user: str, pk: int) -> bool:
    return bool((await s.execute(delete(ApiToken).where(ApiToken.user == user, ApiToken.id == pk))).rowcount)
