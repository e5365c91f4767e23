"""The delivery queue: claiming copies, the workers' heartbeats, recording outcomes, DSN
bookkeeping, purge.

A copy is claimed with one ``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED) RETURNING``;
no lock is held while the worker talks SMTP. A claim (``recipients.lease_owner``) belongs to a
worker process with a row in ``worker_heartbeats``, and holds for as long as that process lives:
a claimed copy (``sending``) is never claimed again, however slow the database or the upstream.
Only when its worker is judged dead are its claims *freed* (back to ``queued``), each counting a
*reclaim*: the dead worker may have delivered the copy before it died, so each reclaim is a
possible duplicate delivery. ``lease_until`` still moves with the claim: a copy whose owner has
no heartbeat row (a worker older than the table) is freed only once it has lapsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, bindparam, delete, exists, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from core.events import Event, EventType
from storage import direct, events
from storage.engine import connection_of
from storage.models import Message, Recipient, WorkerHeartbeat, utcnow

ACTIVE = ("queued", "deferred", "sending")
#: A message is done (its bytes may be purged) when none of its copies is in one of these.
UNFINISHED = (*ACTIVE, "held")
#: What a claim takes: never ``sending``, which is some live worker's until its claims are freed.
CLAIMABLE = ("queued", "deferred")
FINAL = ("sent", "bounced")


@dataclass(frozen=True)
class Claimed:
    id: int
    message_pk: int
    address: str
    token: str | None
    track_opens: bool
    track_clicks: bool
    attempts: int
    last_reply: str | None
    never_log: bool = False
    #: The copy's number within its message (the K of queue id ``N.K``, from 1); 0 when unknown.
    number: int = 0


@dataclass(frozen=True, slots=True)
class Spooled:
    """What delivery needs of a spooled message (a plain record: no ORM instance per message)."""
    id: int
    kind: str
    message_id: str
    user: str | None
    mail_from: str
    accepted_at: datetime
    raw: bytes | None


@dataclass(frozen=True)
class Outcome:
    recipient_id: int
    message_pk: int
    user: str | None
    status: str  # sent | deferred | bounced
    reply: str
    next_attempt_at: datetime | None = None
    dsn_wanted: bool = False
    render_note: str | None = None
    attempts: int = 1  # the copy's attempts after this one
    #: The worker whose claim this settles: the copy is settled only while still that claim
    #: (None: the operator's commands, on copies nobody has claimed).
    owner: str | None = None


async def claim(session: AsyncSession, owner: str, now: datetime, lease_seconds: float,
                limit: int) -> list[Claimed]:
    due = (select(Recipient.id)
           .where(Recipient.status.in_(CLAIMABLE), Recipient.next_attempt_at <= now)
           .order_by(Recipient.next_attempt_at, Recipient.id)
           .limit(limit)
           .with_for_update(skip_locked=True)
           .scalar_subquery())
    stmt = (update(Recipient)
            .where(Recipient.id.in_(due), Recipient.status.in_(CLAIMABLE))
            .values(status="sending", lease_owner=owner,
                    lease_until=now + timedelta(seconds=lease_seconds))
            .returning(Recipient.id, Recipient.message_pk, Recipient.address, Recipient.token,
                       Recipient.track_opens, Recipient.track_clicks, Recipient.attempts,
                       Recipient.last_reply, Recipient.never_log)
            .execution_options(synchronize_session=False))
    rows = (await session.execute(stmt)).all()
    return sorted((Claimed(*row) for row in rows), key=lambda c: (c.message_pk, c.id))


async def renew(session: AsyncSession, owner: str, ids: list[int], until: datetime) -> None:
    if ids:
        await session.execute(update(Recipient)
                              .where(Recipient.id.in_(ids), Recipient.lease_owner == owner,
                                     Recipient.status == "sending")
                              .values(lease_until=until)
                              .execution_options(synchronize_session=False))


async def release(session: AsyncSession, owner: str, ids: list[int]) -> None:
    """Give claimed copies back, untried (a worker stopping before it got to them)."""
    await session.execute(update(Recipient)
                          .where(Recipient.id.in_(ids), Recipient.lease_owner == owner, Recipient.status == "sending")
                          .values(status="queued", lease_owner=None, lease_until=None)
                          .execution_options(synchronize_session=False))


# -- heartbeats: whose claims hold ---------------------------------------------------------------

@dataclass(frozen=True)
class Beat:
    """A worker's heartbeat row, as another worker sees it."""
    owner: str
    machine: str
    pid: int
    pid_started: str
    beats: int


def _freeing() -> dict:
    """What freeing a claim sets: back in the queue (due when it was), one more possible duplicate."""
    return dict(status="queued", lease_owner=None, lease_until=None, reclaims=Recipient.reclaims + 1)


async def register(session: AsyncSession, owner: str, hostname: str, machine: str, pid: int,
                   pid_started: str, now: datetime) -> None:
    await session.execute(insert(WorkerHeartbeat).values(
        owner=owner, hostname=hostname[:255], machine=machine[:200], pid=pid, pid_started=pid_started[:32],
        started_at=now, beat_at=now, beats=0))


async def beat(session: AsyncSession, owner: str, now: datetime) -> bool:
    """Renew this worker's heartbeat; False when its row is gone (another worker judged it dead)."""
    result = await session.execute(update(WorkerHeartbeat).where(WorkerHeartbeat.owner == owner)
                                   .values(beat_at=now, beats=WorkerHeartbeat.beats + 1)
                                   .execution_options(synchronize_session=False))
    return bool(result.rowcount)


async def heartbeats(session: AsyncSession) -> list[Beat]:
    rows = await session.execute(select(WorkerHeartbeat.owner, WorkerHeartbeat.machine, WorkerHeartbeat.pid,
                                        WorkerHeartbeat.pid_started, WorkerHeartbeat.beats))
    return [Beat(*row) for row in rows.all()]


async def free_claims_of(session: AsyncSession, owners: list[str]) -> int:
    """These workers' claims are free (they are dead, or it is this one's clean stop): their
    copies go back to the queue, each a reclaim, and their heartbeat rows go."""
    if not owners:
        return 0
    result = await session.execute(update(Recipient)
                                   .where(Recipient.status == "sending", Recipient.lease_owner.in_(owners))
                                   .values(_freeing()).execution_options(synchronize_session=False))
    await session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.owner.in_(owners))
                          .execution_options(synchronize_session=False))
    return result.rowcount or 0


async def free_claims_but(session: AsyncSession, owner: str) -> int:
    """Every claim not ``owner``'s is free: at the start of the only worker there can be (SQLite)."""
    result = await session.execute(update(Recipient)
                                   .where(Recipient.status == "sending",
                                          or_(Recipient.lease_owner.is_(None), Recipient.lease_owner != owner))
                                   .values(_freeing()).execution_options(synchronize_session=False))
    await session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.owner != owner)
                          .execution_options(synchronize_session=False))
    return result.rowcount or 0


async def free_orphans(session: AsyncSession, now: datetime) -> int:
    """Claims whose owner has no heartbeat row are free once their lease has lapsed."""
    result = await session.execute(
        update(Recipient)
        .where(Recipient.status == "sending",
               or_(Recipient.lease_until.is_(None), Recipient.lease_until < now),
               or_(Recipient.lease_owner.is_(None),
                   ~exists().where(WorkerHeartbeat.owner == Recipient.lease_owner)))
        .values(_freeing()).execution_options(synchronize_session=False))
    return result.rowcount or 0


async def copy_numbers(session: AsyncSession, message_pks: set[int]) -> dict[int, int]:
    """Each copy's number within its message (recipients in id order, from 1)."""
    rows = await session.execute(select(Recipient.id, Recipient.message_pk)
                                 .where(Recipient.message_pk.in_(message_pks)).order_by(Recipient.id))
    seen: dict[int, int] = {}
    out: dict[int, int] = {}
    for rid, mpk in rows.all():
        seen[mpk] = out[rid] = seen.get(mpk, 0) + 1
    return out


async def load_messages(session: AsyncSession, pks: set[int]) -> dict[int, Spooled]:
    rows = await session.execute(
        select(Message.id, Message.kind, Message.message_id, Message.user, Message.mail_from,
               Message.accepted_at, Message.raw).where(Message.id.in_(pks)))
    return {row[0]: Spooled(*row) for row in rows.all()}


_RECIPIENTS = Recipient.__table__
#: Settling statements, one per set of columns an outcome sets (built once, reused).
_SETTLE: dict[tuple[str, ...], object] = {}
_MARK_DONE = (update(Message)
              .where(Message.id.in_(bindparam("touched", expanding=True)), Message.done_at.is_(None),
                     ~select(Recipient.id).where(Recipient.message_pk == Message.id,
                                                 Recipient.status.in_(UNFINISHED)).exists())
              .values(done_at=bindparam("now", type_=Message.done_at.type))
              .execution_options(synchronize_session=False))


#: In a settling row's key: the row settles only the claim of this owner (not a column it sets).
_CLAIMANT = "claimant"


def _settle(key: tuple[str, ...]):
    stmt = _SETTLE.get(key)
    if stmt is None:
        stmt = update(_RECIPIENTS).where(_RECIPIENTS.c.id == bindparam("rid"))
        if _CLAIMANT in key:
            stmt = stmt.where(_RECIPIENTS.c.lease_owner == bindparam(_CLAIMANT),
                              _RECIPIENTS.c.status == "sending")
        stmt = _SETTLE[key] = stmt.values({c: bindparam(c) for c in key if c != _CLAIMANT})
    return stmt


async def record(session: AsyncSession | AsyncConnection, outcomes: list[Outcome], now: datetime) -> None:
    """Settle delivered, deferred and bounced copies and write their events: one executemany per
    kind of outcome, one for the events, one to mark finished messages done."""
    if not outcomes:
        return
    by_columns = _settle_rows(outcomes, now)
    conn = await connection_of(session)
    if direct.usable(conn):
        await direct.run(conn, _record_sqlite, outcomes, by_columns, now, events.insert_sql(conn.dialect))
        return
    for columns, rows in by_columns.items():
        await conn.execute(_settle(columns), rows)
    await events.write_events(conn, [_outcome_event(o, now) for o in outcomes])
    touched = {o.message_pk for o in outcomes if o.status in FINAL}
    if touched:
        await conn.execute(_MARK_DONE, {"touched": sorted(touched), "now": now})


def _settle_rows(outcomes: list[Outcome], now: datetime) -> dict[tuple[str, ...], list[dict]]:
    """The settling UPDATE's rows, grouped by the columns they set (and whether they settle a
    worker's claim: a claim freed meanwhile, its worker judged dead, is another's now)."""
    by_columns: dict[tuple[str, ...], list[dict]] = {}
    for o in outcomes:
        row = {"rid": o.recipient_id, "status": o.status, "last_reply": o.reply[:2000],
               "lease_owner": None, "lease_until": None, "attempts": o.attempts,
               "render_note": o.render_note, "sent_at": now if o.status == "sent" else None}
        if o.status == "deferred":
            row["next_attempt_at"] = o.next_attempt_at or now
        elif o.status == "bounced":
            row["dsn"] = "pending" if o.dsn_wanted else "suppressed"
        if o.owner is not None:
            row[_CLAIMANT] = o.owner
        by_columns.setdefault(tuple(k for k in row if k != "rid"), []).append(row)
    return by_columns


async def record_committed(engine: AsyncEngine, outcomes: list[Outcome], now: datetime) -> None:
    """``record`` in a transaction of its own (on SQLite, statements and commit in one trip)."""
    if outcomes and direct.usable(engine):
        await direct.transaction(engine, _record_sqlite, outcomes, _settle_rows(outcomes, now), now,
                                 events.insert_sql(engine.dialect))
        return
    async with engine.begin() as conn:
        await record(conn, outcomes, now)


#: The event of each outcome's status.
_OUTCOME_TYPES = {"sent": EventType.SENT, "deferred": EventType.DEFERRED, "bounced": EventType.BOUNCED}


def _outcome_event(o: Outcome, at) -> Event:
    """An outcome's event (``at`` a datetime, or already as the path binds it)."""
    return Event(_OUTCOME_TYPES[o.status], o.message_pk, at, o.recipient_id, o.user, reason=o.reply[:500])


_TIME_COLUMNS = frozenset({"lease_until", "sent_at", "next_attempt_at"})
_UNFINISHED_SQL = ", ".join(f"'{s}'" for s in UNFINISHED)


def _record_sqlite(db: direct.Db, outcomes: list[Outcome], by_columns: dict[tuple[str, ...], list[dict]],
                   at: datetime, events_sql: str) -> None:
    """``record`` on SQLite's thread: the same statements, one trip."""
    cur = db.cursor()
    for key, rows in by_columns.items():
        columns = [c for c in key if c != _CLAIMANT]
        sets = ", ".join(f'"{c}" = ?' for c in columns)
        if _CLAIMANT in key:
            where, extra = "id = ? AND lease_owner = ? AND status = 'sending'", lambda row: (row[_CLAIMANT],)
        else:
            where, extra = "id = ?", lambda row: ()
        cur.executemany(f'UPDATE recipients SET {sets} WHERE {where}', [
            tuple(events.sqlite_time(row[c]) if c in _TIME_COLUMNS and row[c] is not None else row[c]
                  for c in columns) + (row["rid"],) + extra(row) for row in rows])
    now = events.sqlite_time(at)
    cur.executemany(events_sql, [_outcome_event(o, now).as_row() for o in outcomes])
    touched = sorted({o.message_pk for o in outcomes if o.status in FINAL})
    if touched:
        cur.execute(f"UPDATE messages SET done_at = ? WHERE id IN ({direct.in_list(len(touched))}) "
                    "AND done_at IS NULL AND NOT EXISTS (SELECT 1 FROM recipients WHERE "
                    f"recipients.message_pk = messages.id AND recipients.status IN ({_UNFINISHED_SQL}))",
                    (now, *touched))
    cur.close()


async def pending_dsns(session: AsyncSession, limit: int = 50) -> dict[int, list[Recipient]]:
    """Bounced copies whose DSN is still to be written, grouped by message."""
    rows = (await session.execute(
        select(Recipient).where(Recipient.dsn == "pending").order_by(Recipient.message_pk)
        .limit(limit).with_for_update(skip_locked=True))).scalars().all()
    out: dict[int, list[Recipient]] = {}
    for r in rows:
        out.setdefault(r.message_pk, []).append(r)
    return out


async def mark_dsn(session: AsyncSession, recipient_ids: list[int], state: str) -> None:
    await session.execute(update(Recipient).where(Recipient.id.in_(recipient_ids)).values(dsn=state)
                          .execution_options(synchronize_session=False))


async def purge_delivered(session: AsyncSession, older_than: datetime) -> int:
    """Drop the spooled bytes of messages that reached a final state long enough ago."""
    result = await session.execute(
        update(Message).where(Message.done_at.is_not(None), Message.done_at < older_than,
                              Message.raw.is_not(None))
        .values(raw=None, purged_at=utcnow()).execution_options(synchronize_session=False))
    return result.rowcount or 0


# -- operator commands (trackrelay queue …) -----------------------------------------------------

async def list_waiting(session: AsyncSession) -> list[tuple]:
    rows = await session.execute(
        select(Recipient.id, Recipient.message_pk, Message.message_id, Recipient.address,
               Recipient.status, Recipient.attempts, Recipient.next_attempt_at, Recipient.last_reply)
        .join(Message, Message.id == Recipient.message_pk)
        .where(Recipient.status.in_(ACTIVE)).order_by(Recipient.next_attempt_at))
    return list(rows.all())


async def retry_now(session: AsyncSession, ids: list[int] | None, now: datetime) -> int:
    cond = [Recipient.status.in_(("queued", "deferred"))]
    if ids:
        cond.append(Recipient.id.in_(ids))
    res = await session.execute(update(Recipient).where(and_(*cond)).values(next_attempt_at=now)
                                .execution_options(synchronize_session=False))
    return res.rowcount or 0


async def force_bounce(session: AsyncSession, ids: list[int], now: datetime) -> int:
    """Bounce waiting copies by hand: each gets a `bounced` event and its sender a DSN."""
    rows = (await session.execute(
        select(Recipient.id, Recipient.message_pk, Message.user, Message.mail_from, Message.kind,
               Recipient.attempts)
        .join(Message, Message.id == Recipient.message_pk)
        .where(Recipient.id.in_(ids), Recipient.status.in_(("queued", "deferred"))))).all()
    outcomes = [Outcome(rid, mpk, user, "bounced", "554 5.0.0 Bounced by the operator",
                        dsn_wanted=bool(mail_from) and kind == "mail", attempts=attempts)
                for rid, mpk, user, mail_from, kind, attempts in rows]
    # Ordinary records, so the attempt counter moves like any other settlement.
    await record(session, outcomes, now)
    return len(outcomes)

