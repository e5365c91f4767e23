"""The tables: spooled messages, their per-recipient copies (with plan and delivery state), the
event log, and the CRM-logging jobs committed with each message.

Every schema change goes through an Alembic migration in ``storage/migrations/versions``.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, false,
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
    #: On a Never Log list when accepted: never logged, never updates contact dates.
    never_log: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: Why instrumentation was skipped or failed (fail open), when it was.
    render_note: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: none | pending | sent | suppressed: the DSN for a bounced copy.
    dsn: Mapped[str] = mapped_column(String(12), default="none")

    message: Mapped[Message] = relationship(back_populates="recipients", lazy="raise")


class Event(Base):
    """The event log: delivery events from the relay, opens and clicks from the tracker."""

    __tablename__ = "events"
    #: "Has this recipient a human open (click, reply) yet?" as an index seek (storage.events).
    __table_args__ = (Index("ix_events_recipient_type", "recipient_pk", "type", "classification"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    type: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    message_pk: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    recipient_pk: Mapped[int | None] = mapped_column(ForeignKey("recipients.id", ondelete="CASCADE"))
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
    #: PostgreSQL: the writing transaction's id (server default txid_current()), for a cursor in
    #: commit order. NULL on SQLite, whose single writer commits in id order.
    txid: Mapped[int | None] = mapped_column(BigInteger)


class WorkerHeartbeat(Base):
    """One row per running delivery worker: its claims on copies (``recipients.lease_owner``) hold
    while its heartbeat moves. A worker judged dead (its heartbeat unchanged through several of
    another worker's renewals, or its process gone on the same machine) has its claims freed."""

    __tablename__ = "worker_heartbeats"

    #: The worker's identity, as written into ``recipients.lease_owner``.
    owner: Mapped[str] = mapped_column(String(100), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255), default="")
    #: Boot id and PID namespace of its machine: on the same one, a gone ``pid`` is a dead worker.
    machine: Mapped[str] = mapped_column(String(200), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    #: The process's start time on its machine (guards against a reused pid).
    pid_started: Mapped[str] = mapped_column(String(32), default="")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    beat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: Renewals so far: others judge liveness by whether it moves, not by comparing clocks.
    beats: Mapped[int] = mapped_column(BigInteger, default=0)


class WebhookCursor(Base):
    """How far each webhook has been delivered: its durable outbox is the event log after it."""

    __tablename__ = "webhook_cursors"

    url: Mapped[str] = mapped_column(String(2000), primary_key=True)
    cursor: Mapped[str] = mapped_column(String(64), default="0.0")
    failing_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered: Mapped[int] = mapped_column(BigInteger, default=0)
    given_up: Mapped[int] = mapped_column(BigInteger, default=0)
    #: One worker delivers a webhook at a time (several worker processes share the table).
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)


class CrmJob(Base):
    """A CRM-logging job, committed with the message before the 250."""

    __tablename__ = "crm_jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    message_pk: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(12), default="pending")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)


# -- the CRM (migration 0002) ---------------------------------------------------------------------

class Company(Base):
    """A company, one per email domain (free-mail domains have none)."""

    __tablename__ = "companies"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    domain: Mapped[str] = mapped_column(String(253), unique=True)
    name: Mapped[str] = mapped_column(String(253), default="")


class Contact(Base):
    __tablename__ = "contacts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)  # lower-cased
    owner: Mapped[str | None] = mapped_column(String(200))
    marketing: Mapped[bool] = mapped_column(Boolean, default=False)
    #: One of the six GDPR bases, or NULL.
    legal_basis: Mapped[str | None] = mapped_column(String(32))
    do_not_track: Mapped[bool] = mapped_column(Boolean, default=False)
    company_pk: Mapped[int | None] = mapped_column(ForeignKey("companies.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_open_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_click_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_engagement_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Deal(Base):
    """A deal or a ticket (``kind``), linked to contacts; open ones get new logged emails."""

    __tablename__ = "deals"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), default="deal")  # deal | ticket
    name: Mapped[str] = mapped_column(String(500), default="")
    is_open: Mapped[bool] = mapped_column(Boolean, default=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DealContact(Base):
    __tablename__ = "deal_contacts"

    deal_pk: Mapped[int] = mapped_column(ForeignKey("deals.id", ondelete="CASCADE"), primary_key=True)
    contact_pk: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True,
                                            index=True)


class LoggedEmail(Base):
    """A copy of an email on the CRM: the original as sent or received, never our pixel or links."""

    __tablename__ = "logged_emails"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    direction: Mapped[str] = mapped_column(String(8))  # outgoing | incoming
    message_pk: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"), index=True)
    user: Mapped[str | None] = mapped_column(String(200), index=True)  # the sender (outgoing) or log owner
    message_id: Mapped[str] = mapped_column(String(998), index=True)
    in_reply_to: Mapped[str | None] = mapped_column(Text)
    references: Mapped[str | None] = mapped_column(Text)
    thread_key: Mapped[str] = mapped_column(String(998), index=True)  # the thread's root Message-ID
    subject: Mapped[str] = mapped_column(Text, default="")
    from_: Mapped[str] = mapped_column("from_addr", Text, default="")
    to: Mapped[str] = mapped_column("to_addr", Text, default="")
    cc: Mapped[str] = mapped_column("cc_addr", Text, default="")
    date: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    text: Mapped[str | None] = mapped_column(Text, deferred=True)
    html: Mapped[str | None] = mapped_column(Text, deferred=True)
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    omitted_attachments: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LoggedAssociation(Base):
    """A logged email on a record's timeline: a contact, company, deal or ticket."""

    __tablename__ = "logged_associations"

    logged_pk: Mapped[int] = mapped_column(ForeignKey("logged_emails.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # contact | company | deal | ticket
    target_pk: Mapped[int] = mapped_column(BigId, primary_key=True)


class Attachment(Base):
    """Attachment bytes, stored once per content hash."""

    __tablename__ = "attachments"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)


class LoggedAttachment(Base):
    __tablename__ = "logged_attachments"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    logged_pk: Mapped[int] = mapped_column(ForeignKey("logged_emails.id", ondelete="CASCADE"), index=True)
    attachment_pk: Mapped[int] = mapped_column(ForeignKey("attachments.id", ondelete="RESTRICT"), index=True)
    filename: Mapped[str] = mapped_column(Text, default="")
    content_type: Mapped[str] = mapped_column(String(200), default="application/octet-stream")


class NeverLog(Base):
    """A Never Log entry (``name@domain`` or ``*@domain``), of the team or of one user."""

    __tablename__ = "never_log"
    __table_args__ = (Index("ux_never_log_entry", "scope", "user", "entry", unique=True),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    scope: Mapped[str] = mapped_column(String(8))  # team | user
    user: Mapped[str] = mapped_column(String(200), default="")  # "" for the team list
    entry: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
