"""What the operator's commands read and change (``trackrelay queue …``, ``trackrelay db current``).

One queue id: a message is named by its ``messages`` primary key — the number in the relay's
``250 2.0.0 OK: queued as N`` — and one of its copies by ``N.K``, K counting the message's
recipients from 1 in the order they were given. Every change is one statement whose ``WHERE``
repeats the statuses it may act on, so a copy a worker claims meanwhile (status ``sending``) is
left alone rather than changed under the worker's feet.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, case, event, exists, select, update
from sqlalchemy import delete as sql_delete
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from storage import queue as q
from storage.models import Event, Message, Recipient

#: Every status a copy can have. ``held``: kept out of delivery by the operator until released
#: (the worker's claim selects only queued and deferred copies); ``deleted``: taken out of the
#: queue by the operator, without a DSN.
STATUSES = ("queued", "sending", "deferred", "held", "sent", "bounced", "deleted")
#: What `queue list` shows unless --status says otherwise: copies not yet delivered or bounced.
WAITING = ("queued", "sending", "deferred", "held")
#: The statuses each action may change.
ACTS_ON = {
    "retry": ("queued", "deferred"),
    "hold": ("queued", "deferred"),
    "release": ("held",),
    "bounce": ("queued", "deferred", "held"),
    "delete": ("queued", "deferred", "held"),
}
BOUNCE_REPLY = "554 5.0.0 Bounced by the operator"
#: Copies that keep a message from being done (its bytes from being purged).
_NOT_DONE = q.UNFINISHED


class SelectionError(Exception):
    """An id that names no message or copy; or an id that is not one."""


# -- the schema, read without changing it ------------------------------------------------------

def sqlite_path(url: str) -> str | None:
    """The file of a SQLite URL (None for another database or an in-memory one)."""
    u = make_url(url)
    if not u.drivername.startswith("sqlite") or not u.database or u.database == ":memory:":
        return None
    return u.database


def open_engine(url: str, *, read_only: bool) -> AsyncEngine:
    """An engine for one command. Read-only: SQLite's ``query_only``, PostgreSQL's read-only
    transactions — a read-only command cannot write even by mistake."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30}, pool_size=1, max_overflow=0)

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            if read_only:
                cur.execute("PRAGMA query_only=ON")
            cur.close()
        return engine
    args = {"server_settings": {"default_transaction_read_only": "on"}} if read_only else {}
    return create_async_engine(url, pool_size=2, max_overflow=0, connect_args=args)


@dataclass(frozen=True)
class SchemaState:
    current: tuple[str, ...]  # the database's revision(s); () when it has none
    heads: tuple[str, ...]    # what this trackrelay's migrations end in

    @property
    def up_to_date(self) -> bool:
        return set(self.current) == set(self.heads)

    @property
    def unknown(self) -> tuple[str, ...]:
        """Revisions in the database that this trackrelay has no migration for (a newer one's)."""
        known = {r.revision for r in revisions()}
        return tuple(r for r in self.current if r not in known)


def revisions() -> list:
    """This trackrelay's migrations, newest first (alembic Script objects)."""
    from alembic.script import ScriptDirectory

    from storage.migrate import alembic_config
    return list(ScriptDirectory.from_config(alembic_config()).walk_revisions())


async def schema_state(engine: AsyncEngine) -> SchemaState:
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from storage.migrate import alembic_config

    def current(sync_conn):
        return tuple(MigrationContext.configure(sync_conn).get_current_heads())

    async with engine.connect() as conn:
        cur = await conn.run_sync(current)
    heads = tuple(ScriptDirectory.from_config(alembic_config()).get_heads())
    return SchemaState(cur, heads)


# -- selecting messages and copies -------------------------------------------------------------

_SELECTOR = re.compile(r"^(\d{1,18})(?:\.(\d{1,6}))?$")


def parse_selector(text: str) -> tuple[int, int | None]:
    """``42`` → (42, None): the message; ``42.2`` → (42, 2): its second copy."""
    m = _SELECTOR.match(text.strip())
    if not m or (m.group(2) is not None and int(m.group(2)) < 1):
        raise SelectionError(f"{text!r} is not a queue id (ID, or ID.N for copy N of message ID)")
    return int(m.group(1)), int(m.group(2)) if m.group(2) is not None else None


@dataclass
class Copy:
    id: int           # recipients.id (internal)
    message_pk: int
    n: int            # 1-based, in recipient order
    address: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_reply: str | None

    @property
    def qid(self) -> str:
        return f"{self.message_pk}.{self.n}"


@dataclass
class QueuedMessage:
    id: int
    kind: str
    message_id: str
    user: str | None
    mail_from: str
    subject: str
    accepted_at: datetime
    size: int
    copies: list[Copy] = field(default_factory=list)


@dataclass
class Filters:
    statuses: tuple[str, ...] | None = None  # None: every status
    user: str | None = None
    older_than: timedelta | None = None

    def conditions(self, now: datetime) -> list:
        cond = []
        if self.statuses is not None:
            cond.append(Recipient.status.in_(self.statuses))
        if self.user is not None:
            cond.append(Message.user == self.user)
        if self.older_than is not None:
            cond.append(Message.accepted_at < now - self.older_than)
        return cond


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``2h``, ``3d``, ``1w`` (a bare number is seconds)."""
    m = _DURATION.match(text.strip().lower())
    if not m:
        raise SelectionError(f"{text!r} is not a duration (like 90s, 30m, 2h, 3d, 1w)")
    return timedelta(seconds=float(m.group(1)) * _UNIT[m.group(2)])


async def _copies_of(session: AsyncSession, message_pks: set[int]) -> dict[int, list[Copy]]:
    """Every copy of these messages, numbered."""
    out: dict[int, list[Copy]] = {}
    if not message_pks:
        return out
    rows = await session.execute(
        select(Recipient.id, Recipient.message_pk, Recipient.address, Recipient.status, Recipient.attempts,
               Recipient.next_attempt_at, Recipient.last_reply)
        .where(Recipient.message_pk.in_(sorted(message_pks))).order_by(Recipient.message_pk, Recipient.id))
    for rid, mpk, addr, status, attempts, nxt, reply in rows.all():
        copies = out.setdefault(mpk, [])
        copies.append(Copy(rid, mpk, len(copies) + 1, addr, status, attempts, nxt, reply))
    return out


async def list_queue(session: AsyncSession, filters: Filters, now: datetime,
                     selectors: list[tuple[int, int | None]] | None = None) -> list[QueuedMessage]:
    """Messages with a copy that the filters (and ids, when given) select, oldest first, each
    with the copies selected."""
    cond = filters.conditions(now)
    wanted = await resolve(session, selectors) if selectors else None
    if wanted is not None:
        cond.append(Recipient.id.in_(sorted(c.id for c in wanted)))
    pks = set((await session.scalars(
        select(Recipient.message_pk).join(Message, Message.id == Recipient.message_pk)
        .where(and_(*cond)).distinct())).all())
    if not pks:
        return []
    copies = await _copies_of(session, pks)
    rows = await session.execute(
        select(Message.id, Message.kind, Message.message_id, Message.user, Message.mail_from, Message.subject,
               Message.accepted_at, Message.size).where(Message.id.in_(sorted(pks)))
        .order_by(Message.accepted_at, Message.id))
    wanted_ids = {c.id for c in wanted} if wanted is not None else None
    out = []
    for row in rows.all():
        m = QueuedMessage(*row)
        m.copies = [c for c in copies.get(m.id, [])
                    if (filters.statuses is None or c.status in filters.statuses)
                    and (wanted_ids is None or c.id in wanted_ids)]
        out.append(m)
    return out


async def resolve(session: AsyncSession, selectors: list[tuple[int, int | None]]) -> list[Copy]:
    """The copies named by message ids and ``ID.N``s; SelectionError naming every one that names
    nothing (and nothing resolved then)."""
    copies = await _copies_of(session, {mpk for mpk, _ in selectors})
    missing, out, seen = [], [], set()
    for mpk, n in selectors:
        mine = copies.get(mpk)
        if not mine:
            missing.append(f"{mpk}: no such message")
            continue
        if n is not None and n > len(mine):
            missing.append(f"{mpk}.{n}: message {mpk} has {len(mine)} "
                           f"{'copy' if len(mine) == 1 else 'copies'}")
            continue
        for c in (mine if n is None else [mine[n - 1]]):
            if c.id not in seen:
                seen.add(c.id)
                out.append(c)
    if missing:
        raise SelectionError("; ".join(missing))
    return out


async def select_copies(session: AsyncSession, selectors: list[tuple[int, int | None]] | None,
                        filters: Filters, now: datetime) -> list[Copy]:
    """Ids (each must name something), narrowed by the filters; or the filters alone."""
    if selectors:
        named = await resolve(session, selectors)
        if filters == Filters():
            return named
        keep = set((await session.scalars(
            select(Recipient.id).join(Message, Message.id == Recipient.message_pk)
            .where(Recipient.id.in_(sorted(c.id for c in named)), *filters.conditions(now)))).all())
        return [c for c in named if c.id in keep]
    listed = await list_queue(session, filters, now)
    return [c for m in listed for c in m.copies]


# -- one message in full -----------------------------------------------------------------------

async def show(session: AsyncSession, message_pk: int) -> dict | None:
    """Envelope, headers, per-copy plan and reasons, and every delivery attempt of one message."""
    msg = (await session.scalars(select(Message).where(Message.id == message_pk))).first()
    if msg is None:
        return None
    raw = (await session.execute(select(Message.raw).where(Message.id == message_pk))).scalar()
    rcpts = (await session.scalars(select(Recipient).where(Recipient.message_pk == message_pk)
                                   .order_by(Recipient.id))).all()
    attempts = (await session.execute(
        select(Event.recipient_pk, Event.type, Event.at, Event.reason)
        .where(Event.message_pk == message_pk, Event.type.in_(("sent", "deferred", "bounced")))
        .order_by(Event.id))).all()
    by_copy: dict[int, list[dict]] = {}
    for rid, kind, at, reason in attempts:
        by_copy.setdefault(rid, []).append({"at": _iso(at), "outcome": kind, "reply": reason})
    headers = None
    if raw is not None:  # the spooled form is CRLF throughout: the head ends at the first empty line
        end = raw.find(b"\r\n\r\n")
        headers = raw[:end if end >= 0 else len(raw)].decode("utf-8", "replace")
    return {
        "id": msg.id, "kind": msg.kind, "message_id": msg.message_id, "user": msg.user,
        "envelope": {"mail_from": msg.mail_from, "rcpt_to": [r.address for r in rcpts]},
        "client_ip": msg.client_ip, "accepted_at": _iso(msg.accepted_at), "size": msg.size,
        "subject": msg.subject, "from": msg.from_header, "log": msg.log, "done_at": _iso(msg.done_at),
        "purged_at": _iso(msg.purged_at), "headers": headers,
        "copies": [{
            "copy": f"{msg.id}.{n}", "address": r.address, "status": r.status, "tries": r.attempts,
            "next_attempt_at": _iso(r.next_attempt_at) if r.status in q.ACTIVE else None,
            "last_reply": r.last_reply, "sent_at": _iso(r.sent_at),
            "lease_owner": r.lease_owner if r.status == "sending" else None,
            "lease_until": _iso(r.lease_until) if r.status == "sending" else None,
            "plan": {"track_opens": r.track_opens, "track_clicks": r.track_clicks, "log": r.log,
                     "never_log": r.never_log, "instrumented": r.token is not None,
                     "reasons": list(r.reasons or [])},
            "render_note": r.render_note, "reclaims": r.reclaims, "dsn": r.dsn,
            "attempts": by_copy.get(r.id, []),
        } for n, r in enumerate(rcpts, 1)],
    }


def _iso(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t else None


# -- changing the queue ------------------------------------------------------------------------

async def retry(session: AsyncSession, ids: list[int], now: datetime) -> list[int]:
    """Due now: the worker takes them at its next claim (within a second)."""
    return await _update(session, ids, "retry", {"next_attempt_at": now})


async def hold(session: AsyncSession, ids: list[int], now: datetime) -> list[int]:
    return await _update(session, ids, "hold", {"status": "held"})


async def release(session: AsyncSession, ids: list[int], now: datetime) -> list[int]:
    """Back to the queue, due now: ``deferred`` when it was tried before, else ``queued``."""
    done = await _update(session, ids, "release", {
        "status": case((Recipient.attempts > 0, "deferred"), else_="queued"), "next_attempt_at": now})
    if done:  # not done after all, whatever a settlement of a sibling copy said meanwhile
        pks = select(Recipient.message_pk).where(Recipient.id.in_(done)).scalar_subquery()
        await session.execute(update(Message).where(Message.id.in_(pks), Message.raw.is_not(None))
                              .values(done_at=None).execution_options(synchronize_session=False))
    return done


async def _update(session: AsyncSession, ids: list[int], action: str, values: dict) -> list[int]:
    if not ids:
        return []
    res = await session.execute(
        update(Recipient).where(Recipient.id.in_(ids), Recipient.status.in_(ACTS_ON[action]))
        .values(**values).returning(Recipient.id).execution_options(synchronize_session=False))
    return sorted(res.scalars().all())


async def bounce(session: AsyncSession, ids: list[int], now: datetime) -> list[int]:
    """Bounce waiting copies as the worker bounces a copy: a ``bounced`` event, and a DSN to the
    sender (written by the worker's next DSN pass) unless the message is a DSN itself.

    The copies are first taken as a worker takes them (status ``sending``, in one statement that
    skips any a worker holds), then settled through storage.queue.record, the worker's own path."""
    if not ids:
        return []
    owner = f"operator:{os.getpid()}"
    taken = (await session.execute(
        update(Recipient).where(Recipient.id.in_(ids), Recipient.status.in_(ACTS_ON["bounce"]))
        .values(status="sending", lease_owner=owner, lease_until=now + timedelta(minutes=5))
        .returning(Recipient.id).execution_options(synchronize_session=False))).scalars().all()
    if not taken:
        return []
    rows = (await session.execute(
        select(Recipient.id, Recipient.message_pk, Message.user, Message.mail_from, Message.kind, Recipient.attempts)
        .join(Message, Message.id == Recipient.message_pk).where(Recipient.id.in_(taken)))).all()
    await q.record(session, [q.Outcome(rid, mpk, user, "bounced", BOUNCE_REPLY,
                                       dsn_wanted=bool(mail_from) and kind == "mail", attempts=attempts,
                                       owner=owner)
                             for rid, mpk, user, mail_from, kind, attempts in rows], now)
    return sorted(taken)


async def delete(session: AsyncSession, ids: list[int], now: datetime) -> tuple[list[int], list[int]]:
    """Take waiting copies out of the queue for good, without a DSN: status ``deleted`` (the row
    stays, so the other copies keep their numbers). A message none of whose copies went anywhere
    is then removed whole — its rows, events and pending CRM-logging job: it reached nobody.
    Returns the copies deleted and the messages removed."""
    if not ids:
        return [], []
    gone = (await session.execute(
        update(Recipient).where(Recipient.id.in_(ids), Recipient.status.in_(ACTS_ON["delete"]))
        .values(status="deleted", dsn="suppressed", lease_owner=None, lease_until=None)
        .returning(Recipient.id, Recipient.message_pk).execution_options(synchronize_session=False))).all()
    if not gone:
        return [], []
    pks = sorted({mpk for _, mpk in gone})
    empty = (await session.scalars(
        select(Message.id).where(Message.id.in_(pks),
                                 ~exists().where(Recipient.message_pk == Message.id,
                                                 Recipient.status != "deleted")))).all()
    if empty:
        await session.execute(sql_delete(Message).where(Message.id.in_(empty))
                              .execution_options(synchronize_session=False))
    await _mark_done(session, set(pks) - set(empty), now)
    return sorted(rid for rid, _ in gone), sorted(empty)


async def _mark_done(session: AsyncSession, pks: set[int], now: datetime) -> None:
    """Messages with no copy left to deliver are done (their bytes purged in time)."""
    if pks:
        await session.execute(
            update(Message).where(Message.id.in_(sorted(pks)), Message.done_at.is_(None),
                                  ~exists().where(Recipient.message_pk == Message.id,
                                                  Recipient.status.in_(_NOT_DONE)))
            .values(done_at=now).execution_options(synchronize_session=False))
