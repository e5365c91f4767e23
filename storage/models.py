"""The tables: spooled messages, their per-recipient copies (with plan and delivery state), the
event log, and the CRM-logging jobs committed with each message.

Every schema change goes through an Alembic migration in ``storage/migrations/versions``.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, ForeignKey, Index, Integer,
                        LargeBinary, String, Text, TypeDecorator)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on both SQLite (which stores naive text) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Message(Base):
    """One accepted message: its spooled bytes and envelope."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    #: 'mail' for submitted mail, 'dsn' for the delivery status notifications we generate.
    kind: Mapped[str] = mapped_column(String(8), default="mail")
    message_id: Mapped[str] = mapped_column(String(998), index=True)
    #: The authenticated user who sent it (for a DSN: the user of the bounced message).
    user: Mapped[str | None] = mapped_column(String(200), index=True)
    mail_from: Mapped[str] = mapped_column(String(320))
    from_header: Mapped[str] = mapped_column(Text, default="")
    subject: Mapped[str] = mapped_column(Text, default="")
    client_ip: Mapped[str | None] = mapped_column(String(64))
    accepted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    size: Mapped[int] = mapped_column(Integer)
    #: The spooled form: CRLF-normalised, Received and Message-ID added, control headers removed.
    #: NULL once purged (queue.keep_delivered_days after every copy reached a final state).
    raw: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    log: Mapped[bool] = mapped_column(Boolean, default=False)
    log_associate: Mapped[str | None] = mapped_column(Text)
    #: Set when every copy is sent or bounced.
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    recipients: Mapped[list["Recipient"]] = relationship(back_populates="message", lazy="raise")


class Recipient(Base):
    """One recipient's copy: its plan (decisions, reasons, token) and its delivery state."""

    __tablename__ = "recipients"
    __table_args__ = (Index("ix_recipients_due", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    message_pk: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    address: Mapped[str] = mapped_column(String(320))
    #: >= 128 random bits, minted at acceptance; NULL when the copy is not instrumented at all.
    token: Mapped[str | None] = mapped_column(String(64), unique=True)
    track_opens: Mapped[bool] = mapped_column(Boolean, default=False)
    track_clicks: Mapped[bool] = mapped_column(Boolean, default=False)
    log: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The policy decisions, e.g. ["tracking_disabled"], ["x_track:opens"], ["internal"].
    reasons: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: queued | sending | deferred | sent | bounced
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Claims that found an earlier claim never settled: each may be a duplicate delivery.
    reclaims: Mapped[int] = mapped_column(Integer, default=0)
    last_reply: Mapped[str | None] = mapped_column(Text)
    #: Why instrumentation was skipped or failed (fail open), when it was.
    render_note: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: none | pending | sent | suppressed: the DSN for a bounced copy.
    dsn: Mapped[str] = mapped_column(String(12), default="none")

    message: Mapped[Message] = relationship(back_populates="recipients", lazy="raise")


class Event(Base):
    """The event log: delivery events from the relay, opens and clicks from the tracker."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    type: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    message_pk: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    recipient_pk: Mapped[int | None] = mapped_column(ForeignKey("recipients.id", ondelete="CASCADE"), index=True)
    user: Mapped[str | None] = mapped_column(String(200), index=True)
    url: Mapped[str | None] = mapped_column(Text)
    ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(Text)
    client: Mapped[str | None] = mapped_column(String(100))
    classification: Mapped[str | None] = mapped_column(String(10))
    reason: Mapped[str | None] = mapped_column(Text)
    first: Mapped[bool] = mapped_column(Boolean, default=False)
    inferred: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Idempotency key of the writer (a retried batch writes nothing twice).
    dedupe_key: Mapped[str | None] = mapped_column(String(100), unique=True)


class CrmJob(Base):
    """A CRM-logging job, committed with the message before the 250."""

    __tablename__ = "crm_jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    message_pk: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(12), default="pending")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
