"""The durable spool: what is committed before the SMTP 250, written in group commits.

Concurrent SMTP sessions hand their accepted messages to one ``core.batcher.Batcher``
(``spool_writer``); it writes everything that is waiting in one transaction (one fsync), then
answers each session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from storage import direct, events
from storage.engine import connection_of, engine_of
from storage.models import CrmJob, Message, Recipient, utcnow
from core.events import Event, EventType
#: The group commit lives in core.batcher; imported here by name for the spool's users.
from core.batcher import Batcher


@dataclass
class SpoolRecipient:
    address: str
    token: str | None
    track_opens: bool
    track_clicks: bool
    log: bool
    reasons: list[str]
    never_log: bool = False


@dataclass
class SpoolEntry:
    """An accepted message and its per-recipient plan, as committed before the 250."""

    message_id: str
    user: str | None
    mail_from: str
    raw: bytes
    recipients: list[SpoolRecipient]
    from_header: str = ""
    subject: str = ""
    client_ip: str | None = None
    log: bool = False
    log_associate: str | None = None
    kind: str = "mail"
    accepted_at: datetime = field(default_factory=utcnow)
    #: Hand the copies straight to this process's worker: inserted already claimed by it.
    claim_owner: str | None = None
    lease_until: datetime | None = None


_INSERT_MESSAGES = insert(Message.__table__).returning(Message.__table__.c.id, sort_by_parameter_order=True)
_INSERT_RECIPIENTS = insert(Recipient.__table__).returning(Recipient.__table__.c.id, sort_by_parameter_order=True)
_INSERT_JOBS = insert(CrmJob.__table__)


async def add_entries(session: AsyncSession | AsyncConnection, entries: list[SpoolEntry]) -> list[tuple[int, list[int]]]:
    """Insert the rows of these entries (Core statements built once: a handful per batch, not per
    row; on SQLite one trip to its thread for the whole batch). Returns each message's id with its
    recipient rows' ids, in recipient order."""
    conn = await connection_of(session)
    if direct.usable(conn):
        return await direct.run(conn, _add_entries_sqlite, entries, events.insert_sql(conn.dialect))
    msg_ids = (await conn.execute(_INSERT_MESSAGES, [
        dict(zip(_MESSAGE_COLUMNS, _message_values(e, e.accepted_at))) for e in entries])).scalars().all()
    rcpt_rows = [dict(zip(_RECIPIENT_COLUMNS, _recipient_values(e, mid, r, e.accepted_at, e.lease_until,
                                                                list(r.reasons))))
                 for e, mid in zip(entries, msg_ids) for r in e.recipients]
    rcpt_ids: list[int] = []
    if rcpt_rows:
        rcpt_ids = (await conn.execute(_INSERT_RECIPIENTS, rcpt_rows)).scalars().all()
        users = {mid: e.user for e, mid in zip(entries, msg_ids)}
        now = utcnow()
        await events.write_events(conn, [_queued(row["message_pk"], rid, users[row["message_pk"]], now)
                                         for row, rid in zip(rcpt_rows, rcpt_ids)])
    jobs = [dict(message_pk=mid, state="pending", created_at=e.accepted_at, attempts=0)
            for e, mid in zip(entries, msg_ids) if e.log and e.kind == "mail"]
    if jobs:
        await conn.execute(_INSERT_JOBS, jobs)
    copies: dict[int, list[int]] = {}
    for row, rid in zip(rcpt_rows, rcpt_ids):
        copies.setdefault(row["message_pk"], []).append(rid)
    return [(mid, copies.get(mid, [])) for mid in msg_ids]


_MESSAGE_COLUMNS = ("kind", "message_id", "user", "mail_from", "from_header", "subject", "client_ip",
                    "accepted_at", "size", "raw", "log", "log_associate")
_RECIPIENT_COLUMNS = ("message_pk", "address", "token", "track_opens", "track_clicks", "log", "reasons",
                      "status", "lease_owner", "lease_until", "never_log", "attempts", "next_attempt_at",
                      "reclaims", "dsn")
_MESSAGE_SQL = direct.insert_sql("messages", _MESSAGE_COLUMNS)


def _message_values(e: SpoolEntry, accepted_at) -> tuple:
    """A message row in _MESSAGE_COLUMNS order (``accepted_at`` as the path binds times)."""
    return (e.kind, e.message_id, e.user, e.mail_from, e.from_header, e.subject, e.client_ip, accepted_at,
            len(e.raw), e.raw, e.log, e.log_associate)


def _recipient_values(e: SpoolEntry, mid: int, r: SpoolRecipient, accepted_at, lease_until, reasons) -> tuple:
    """A recipient row in _RECIPIENT_COLUMNS order (times and reasons as the path binds them)."""
    return (mid, r.address, r.token, r.track_opens, r.track_clicks, r.log, reasons,
            "sending" if e.claim_owner else "queued", e.claim_owner, lease_until, r.never_log, 0,
            accepted_at, 0, "none")
_RECIPIENT_SQL = direct.insert_sql("recipients", _RECIPIENT_COLUMNS)
_JOB_SQL = direct.insert_sql("crm_jobs", ("message_pk", "state", "created_at", "attempts"))


def _queued(message_pk: int, recipient_pk: int, user: str | None, at) -> Event:
    """A spooled copy's ``queued`` event (``at`` a datetime, or already as the path binds it)."""
    return Event(EventType.QUEUED, message_pk, at, recipient_pk, user)


def _add_entries_sqlite(db: direct.Db, entries: list[SpoolEntry], events_sql: str) -> list[tuple[int, list[int]]]:
    """``add_entries`` on SQLite's thread: the same rows, ids from ``lastrowid``."""
    cur = db.cursor()
    now = events.sqlite_time(utcnow())
    out: list[tuple[int, list[int]]] = []
    queued: list[tuple] = []
    jobs: list[tuple] = []
    for e in entries:
        at = events.sqlite_time(e.accepted_at)
        cur.execute(_MESSAGE_SQL, _message_values(e, at))
        mid = cur.lastrowid
        lease = events.sqlite_time(e.lease_until) if e.lease_until is not None else None
        rids = []
        for r in e.recipients:
            cur.execute(_RECIPIENT_SQL, _recipient_values(e, mid, r, at, lease, direct.json_text(list(r.reasons))))
            rid = cur.lastrowid
            rids.append(rid)
            queued.append(_queued(mid, rid, e.user, now).as_row())
        if e.log and e.kind == "mail":
            jobs.append((mid, "pending", at, 0))
        out.append((mid, rids))
    if queued:
        cur.executemany(events_sql, queued)
    if jobs:
        cur.executemany(_JOB_SQL, jobs)
    cur.close()
    return out


def spool_writer(sessionmaker: async_sessionmaker) -> Batcher[SpoolEntry, tuple[int, list[int]]]:
    engine = engine_of(sessionmaker)

    async def flush(entries: list[SpoolEntry]) -> list[tuple[int, list[int]]]:
        if direct.usable(engine):  # rows and commit in one trip to SQLite's thread
            return await direct.transaction(engine, _add_entries_sqlite, entries, events.insert_sql(engine.dialect))
        async with engine.begin() as conn:  # Core rows only: no ORM session to set up and close
            return await add_entries(conn, entries)

    return Batcher(flush, name="spool-writer")
