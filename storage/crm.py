"""CRM queries: contacts, companies, deals, Never Log lists, logged emails and their timelines,
the CRM jobs, and the GDPR erase. Each function takes the session (or connection) first and the
caller owns the transaction, except the CRM jobs' (``next_job``/``finish_job``/``job_failed``
take the engine and commit their own).

``log_email`` and the jobs' reads and writes run per logged message: on SQLite they are plain
functions on the driver's thread (``storage.direct``, one trip each), elsewhere SQLAlchemy Core;
``tests/test_crm_storage.py`` proves both store the same rows."""

from __future__ import annotations

import dataclasses
import hashlib
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import AsyncIterator

from sqlalchemy import and_, bindparam, case, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import undefer

from storage import direct
from storage.engine import connection_of
from storage.models import (Attachment, Company, Contact, CrmJob, Deal, DealContact, Event, LoggedAssociation,
                            LoggedAttachment, LoggedEmail, Message, NeverLog, Recipient, UTCDateTime, utcnow)
from core import companies
from core.idn import to_unicode
from core.mailaddr import is_system

#: Free-mail domains get no company (``core/data/freemail.txt``, extendable in the config).
FREE_MAIL = companies.free_mail()


# -- contacts ---------------------------------------------------------------------------------

async def contact_facts(session: AsyncSession, emails: set[str]) -> list[tuple[str, str | None, bool]]:
    """(email, legal basis, do_not_track) of the existing contacts among ``emails``: the relay's
    look-up at acceptance, so a plain column query rather than ORM objects."""
    if not emails:
        return []
    conn = await connection_of(session)
    if direct.usable(conn):
        return await direct.run(conn, _contact_facts_sqlite, list(emails))
    rows = await conn.execute(_CONTACT_FACTS, {"emails": list(emails)})
    return [tuple(r) for r in rows.all()]


class FactsReader:
    """``contact_facts`` for the relay's look-up at acceptance, called once per group of messages.
    On SQLite it keeps one query-only connection checked out (a pool checkout cost as much as the
    query; the direct path's SELECTs open no transaction, so the held connection pins no WAL
    snapshot); elsewhere a connection per call (a held one would sit idle in a transaction)."""

    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._conn: AsyncConnection | None = None

    async def __call__(self, emails: set[str]) -> list[tuple[str, str | None, bool]]:
        if not direct.usable(self._engine):
            async with self._engine.connect() as conn:
                return await contact_facts(conn, emails)
        if self._conn is None:
            self._conn = await self._engine.connect()
        try:
            return await contact_facts(self._conn, emails)
        except BaseException:
            await self.close()  # its state is unknown: the next call opens another
            raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


def _contact_facts_sqlite(db: direct.Db, emails: list[str]) -> list[tuple[str, str | None, bool]]:
    return [(e, basis, bool(dnt)) for e, basis, dnt in direct.select_in(
        db, "SELECT email, legal_basis, do_not_track FROM contacts WHERE email IN ({in})", emails)]


#: Built once: a statement object reused keeps its cache key (SQLAlchemy memoizes it).
_CONTACT_FACTS = (select(Contact.email, Contact.legal_basis, Contact.do_not_track)
                  .where(Contact.email.in_(bindparam("emails", expanding=True))))


async def get_contact(session: AsyncSession, email: str) -> Contact | None:
    return (await session.scalars(select(Contact).where(Contact.email == email.lower()))).first()


def _insert_ignoring(dialect_name: str, model, values: dict):
    """INSERT … ON CONFLICT DO NOTHING: another process (the CRM logger, the inbound listener, a
    second worker) may create the same contact or company at the same moment."""
    ins = postgresql.insert(model) if dialect_name == "postgresql" else sqlite.insert(model)
    return ins.values(**values).on_conflict_do_nothing()


_COMPANY_ID = select(Company.id).where(Company.domain == bindparam("domain"))
_CONTACT_ROW = select(Contact.id, Contact.company_pk).where(Contact.email == bindparam("email"))


async def _company_pk(conn: AsyncConnection, domain: str, free_mail: frozenset[str]) -> int | None:
    """The company of an address at ``domain``: one per registrable domain (``eu.acme.com`` is
    ``acme.com``), IDNA-normalised; none for free mail (the shipped list and ``free_mail``)."""
    key = companies.company_domain(domain, free_mail)
    if key is None:
        return None
    pk = (await conn.execute(_COMPANY_ID, {"domain": key})).scalar()
    if pk is None:
        await conn.execute(_insert_ignoring(conn.dialect.name, Company, {"domain": key, "name": to_unicode(key)}))
        pk = (await conn.execute(_COMPANY_ID, {"domain": key})).scalar_one()
    return pk


def may_create_contact(email: str, create: bool) -> bool:
    """A contact is created only when allowed, never for a bounce sender (``MAILER-DAEMON@…``,
    ``postmaster@…``) or no address."""
    return create and not is_system(email) and "@" in email


async def _create_contact(conn: AsyncConnection, email: str, owner: str | None, free_mail: frozenset[str],
                          now: datetime | None = None) -> tuple[int, int | None]:
    """A new contact (owner, marketing false, company by registrable domain), or the one another
    process created at the same moment: its (id, company_pk)."""
    company = await _company_pk(conn, email.rpartition("@")[2], free_mail)
    await conn.execute(_insert_ignoring(conn.dialect.name, Contact, {
        "email": email, "owner": owner, "marketing": False, "do_not_track": False, "company_pk": company,
        "created_at": now or utcnow()}))
    return tuple((await conn.execute(_CONTACT_ROW, {"email": email})).one())


async def ensure_contact(session: AsyncSession, email: str, owner: str | None, create: bool,
                         free_mail: frozenset[str] = frozenset()) -> Contact | None:
    """The contact for ``email``; created (owner, marketing false, company by registrable domain)
    when allowed (``may_create_contact``). An existing owner is kept."""
    email = email.lower()
    contact = await get_contact(session, email)
    if contact is not None:
        if contact.owner is None and owner:
            contact.owner = owner  # an existing owner is kept
        return contact
    if not may_create_contact(email, create):
        return None
    await _create_contact(await session.connection(), email, owner, free_mail)
    return await get_contact(session, email)


async def company_domain(session: AsyncSession, company_pk: int | None) -> str | None:
    if company_pk is None:
        return None
    return (await session.scalars(select(Company.domain).where(Company.id == company_pk))).first()


_DATE_COLUMNS = ("last_open_at", "last_click_at", "last_engagement_at")


def _later(name: str):
    """SET col = the bound value when it is later than what is stored (dates never move back)."""
    col, value = getattr(Contact, name), bindparam(name, type_=UTCDateTime)
    return case((and_(value.is_not(None), or_(col.is_(None), col < value)), value), else_=col)


_CONTACT_IDS = select(Contact.id, Contact.email).where(Contact.email.in_(bindparam("emails", expanding=True)))
_TOUCH = (update(Contact).where(Contact.id == bindparam("contact"))
          .values({name: _later(name) for name in _DATE_COLUMNS}).execution_options(synchronize_session=False))


async def touch_contacts(session: AsyncSession, updates: dict[str, dict[str, datetime]]) -> None:
    """Move contact dates forward (last_open_at, last_click_at, last_engagement_at), never back.
    ``updates`` is keyed by lower-cased address; addresses without a contact are skipped (only
    logged recipients have one)."""
    if not updates:
        return
    conn = await connection_of(session)
    if direct.usable(conn):
        await direct.run(conn, touch_contacts_sqlite, {
            email: {name: direct.sqlite_time(at) for name, at in moved.items()} for email, moved in updates.items()})
        return
    found = (await conn.execute(_CONTACT_IDS, {"emails": list(updates)})).all()
    if found:
        await conn.execute(_TOUCH, [{"contact": pk, **{n: updates[email].get(n) for n in _DATE_COLUMNS}}
                                    for pk, email in found])


#: One UPDATE per address through the unique email index (none where there is no contact); SQLite's
#: max() of two texts is NULL when either is, hence coalesce: the later of the two, or whichever
#: is set. The stored text sorts as the time does (fixed-width UTC, as ``direct.sqlite_time``).
_TOUCH_SQL = "UPDATE contacts SET " + ", ".join(
    f"{c} = coalesce(max({c}, ?{i}), ?{i}, {c})" for i, c in enumerate(_DATE_COLUMNS, 1)
) + f" WHERE email = ?{len(_DATE_COLUMNS) + 1}"


def touch_contacts_sqlite(db: direct.Db, updates: dict[str, dict[str, str]]) -> None:
    """``touch_contacts`` on SQLite's thread, the dates already in SQLite's text (the tracker's
    events make them from epoch seconds with ``direct.sqlite_epoch``)."""
    db.executemany(_TOUCH_SQL, [(*map(moved.get, _DATE_COLUMNS), email) for email, moved in updates.items()])


# -- Never Log --------------------------------------------------------------------------------

@dataclass(frozen=True)
class NeverLogLists:
    team: frozenset[str]
    personal: frozenset[str]


async def never_log_lists(session: AsyncSession, user: str | None, config_team: tuple[str, ...],
                          config_personal: tuple[str, ...]) -> NeverLogLists:
    rows = (await session.execute(select(NeverLog.scope, NeverLog.entry)
                                  .where(or_(NeverLog.scope == "team",
                                             and_(NeverLog.scope == "user", NeverLog.user == (user or ""))))
                                  )).all()
    team = {e for s, e in rows if s == "team"} | set(config_team)
    personal = {e for s, e in rows if s == "user"} | set(config_personal)
    return NeverLogLists(frozenset(team), frozenset(personal))


async def never_log_db_entries(session: AsyncSession, scope: str, user: str) -> list[str]:
    return list((await session.scalars(select(NeverLog.entry).where(NeverLog.scope == scope, NeverLog.user == user)
                                       .order_by(NeverLog.entry))).all())


async def never_log_add(session: AsyncSession, scope: str, user: str, entries: list[str]) -> list[str]:
    existing = set(await never_log_db_entries(session, scope, user))
    added = []
    for e in entries:
        if e not in existing:
            session.add(NeverLog(scope=scope, user=user, entry=e, created_at=utcnow()))
            existing.add(e)
            added.append(e)
    await session.flush()
    return added


async def never_log_remove(session: AsyncSession, scope: str, user: str, entries: list[str]) -> int:
    res = await session.execute(delete(NeverLog).where(NeverLog.scope == scope, NeverLog.user == user,
                                                       NeverLog.entry.in_(entries)))
    return res.rowcount or 0


# -- logging an email -------------------------------------------------------------------------

@dataclass(frozen=True)
class EmailToLog:
    """One email to log, as ``relay.crm`` decided it: its stored fields (already cut to the
    columns' sizes), whose records it goes to, and what it is associated with."""

    direction: str  # outgoing | incoming
    message_pk: int | None
    user: str | None
    message_id: str
    in_reply_to: str | None
    references: tuple[str, ...]
    subject: str
    from_: str
    to: str
    cc: str
    date: datetime
    text: str | None
    html: str | None
    #: The contacts' addresses, lower-cased, without repeats, in order.
    contact_emails: tuple[str, ...]
    #: The owner of contacts created for it, and of existing ones that have none.
    owner: str | None
    #: Whether missing contacts are created (``may_create_contact`` decides for each).
    create_contacts: bool
    free_mail: frozenset[str] = frozenset()
    #: ``X-Log-Associate``'s (kind, id) pairs (those that exist are used); None: each contact's
    #: ``RECENT_OPEN_DEALS`` most recent open deals and tickets.
    associate: tuple[tuple[str, int], ...] | None = None
    #: The attachments stored: (filename, content type, bytes), cut to the columns' sizes.
    attachments: tuple[tuple[str, str, bytes], ...] = ()
    #: The attachments left out, and why (``logged_emails.omitted_attachments``).
    omitted_attachments: tuple[dict, ...] = ()


@dataclass(frozen=True)
class Logged:
    """A logged email: its id (``logged_emails.id``)."""

    id: int


#: How many open deals and how many open tickets of each contact a logged email is associated with.
RECENT_OPEN_DEALS = 3


def thread_parents(email: EmailToLog) -> list[str]:
    """The Message-IDs whose logged email gives this one its thread, nearest first."""
    return [p for p in ([email.in_reply_to] if email.in_reply_to else []) + list(reversed(email.references)) if p]


def thread_root(email: EmailToLog, parents_thread: str | None) -> str:
    """The root Message-ID of the thread: a logged parent's thread, else References' first."""
    parents = thread_parents(email)
    if not parents:
        return email.message_id
    return parents_thread or (email.references[0] if email.references else parents[0])


def _logged_values(email: EmailToLog, thread: str, created_at: datetime) -> dict:
    """The logged_emails row, by column name (``_LOGGED_COLUMNS``)."""
    return {"direction": email.direction, "message_pk": email.message_pk, "user": email.user,
            "message_id": email.message_id, "in_reply_to": email.in_reply_to,
            "references": " ".join(email.references), "thread_key": thread, "subject": email.subject,
            "from_addr": email.from_, "to_addr": email.to, "cc_addr": email.cc, "date": email.date, "text": email.text,
            "html": email.html, "pinned": False, "omitted_attachments": list(email.omitted_attachments),
            "created_at": created_at}


def _associations(contacts: list[tuple[int, int | None]], deals: set[tuple[str, int]]) -> list[tuple[str, int]]:
    """(kind, target) rows of a logged email: its contacts, their companies, the deals and tickets."""
    out = [("contact", pk) for pk in sorted({pk for pk, _ in contacts})]
    out += [("company", pk) for pk in sorted({c for _, c in contacts if c})]
    for kind in ("deal", "ticket"):
        out += [(kind, i) for i in sorted({i for k, i in deals if k == kind})]
    return out


async def log_email(db: AsyncSession | AsyncConnection, email: EmailToLog) -> Logged | None:
    """Log one email to the records of its contacts (created as ``email`` allows), with its
    associations and attachments, in the caller's transaction. None: nobody to log to.

    On SQLite this is one plain function on the driver's thread (one trip); elsewhere SQLAlchemy
    Core statements, the rows of each table in one executemany."""
    if isinstance(db, AsyncSession):
        await db.flush()  # the session's pending objects first: the rows below bypass it
    conn = await connection_of(db)
    if direct.usable(conn):
        pk = await direct.run(conn, _log_email_sqlite, email, utcnow())
    else:
        pk = await _log_email_core(conn, email, utcnow())
    return None if pk is None else Logged(pk)


_CONTACTS_BY_EMAIL = (select(Contact.email, Contact.id, Contact.owner, Contact.company_pk)
                      .where(Contact.email.in_(bindparam("emails", expanding=True))))
_SET_OWNER = (update(Contact).where(Contact.id == bindparam("contact"), Contact.owner.is_(None))
              .values(owner=bindparam("new_owner")).execution_options(synchronize_session=False))
_PARENTS_THREAD = (select(LoggedEmail.thread_key)
                   .where(LoggedEmail.message_id.in_(bindparam("parents", expanding=True))).limit(1))
_DEALS_BY_ID = select(Deal.kind, Deal.id).where(Deal.id.in_(bindparam("ids", expanding=True)))
_CONTACTS_WITH_DEALS = (select(DealContact.contact_pk).distinct()
                        .where(DealContact.contact_pk.in_(bindparam("pks", expanding=True))))
_RECENT_OPEN = (select(Deal.kind, Deal.id).join(DealContact, DealContact.deal_pk == Deal.id)
                .where(DealContact.contact_pk == bindparam("contact"), Deal.is_open.is_(True),
                       Deal.kind == bindparam("kind"))
                .order_by(Deal.updated_at.desc(), Deal.id.desc()).limit(RECENT_OPEN_DEALS))
_ATTACHMENT_ID = select(Attachment.id).where(Attachment.sha256 == bindparam("sha256"))


async def _log_email_core(conn: AsyncConnection, email: EmailToLog, now: datetime) -> int | None:
    wanted = list(email.contact_emails)
    existing = {e: (pk, owner, company) for e, pk, owner, company in
                (await conn.execute(_CONTACTS_BY_EMAIL, {"emails": wanted})).all()} if wanted else {}
    contacts: list[tuple[int, int | None]] = []
    owners = []
    for addr in wanted:
        found = existing.get(addr)
        if found is not None:
            pk, owner, company = found
            if owner is None and email.owner:
                owners.append({"contact": pk, "new_owner": email.owner})  # an existing owner is kept
            contacts.append((pk, company))
        elif may_create_contact(addr, email.create_contacts):
            contacts.append(await _create_contact(conn, addr, email.owner, email.free_mail, now))
    if not contacts:
        return None
    if owners:
        await conn.execute(_SET_OWNER, owners)
    parents = thread_parents(email)
    found_thread = (await conn.execute(_PARENTS_THREAD, {"parents": parents})).scalar() if parents else None
    logged = (await conn.execute(insert(LoggedEmail).values(_logged_values(
        email, thread_root(email, found_thread), now)))).inserted_primary_key[0]
    deals: set[tuple[str, int]] = set()
    if email.associate is not None:
        ids = [i for _, i in email.associate]
        known = {tuple(r) for r in (await conn.execute(_DEALS_BY_ID, {"ids": ids})).all()} if ids else set()
        deals = {pair for pair in email.associate if pair in known}
    else:
        pks = [pk for pk, _ in contacts]
        with_deals = set((await conn.execute(_CONTACTS_WITH_DEALS, {"pks": pks})).scalars())  # most have none
        for pk in pks:
            if pk in with_deals:
                for kind in ("deal", "ticket"):
                    deals |= {tuple(r) for r in (await conn.execute(_RECENT_OPEN, {"contact": pk, "kind": kind}))}
    await conn.execute(insert(LoggedAssociation), [{"logged_pk": logged, "kind": kind, "target_pk": t}
                                                   for kind, t in _associations(contacts, deals)])
    stored = []
    for filename, ctype, data in email.attachments:
        sha = hashlib.sha256(data).hexdigest()
        apk = (await conn.execute(_ATTACHMENT_ID, {"sha256": sha})).scalar()
        if apk is None:
            apk = (await conn.execute(insert(Attachment).values(sha256=sha, size=len(data), data=data))
                   ).inserted_primary_key[0]
        stored.append({"logged_pk": logged, "attachment_pk": apk, "filename": filename, "content_type": ctype})
    if stored:
        await conn.execute(insert(LoggedAttachment), stored)
    return logged


# The same on SQLite's thread: each statement is the SQL SQLAlchemy compiles for the one above,
# the values bound as it binds them (tests/test_crm_storage.py compares the stored rows).
_SQL_CONTACTS_BY_EMAIL = "SELECT email, id, owner, company_pk FROM contacts WHERE email IN ({in})"
_SQL_SET_OWNER = "UPDATE contacts SET owner = ? WHERE id = ? AND owner IS NULL"
_SQL_COMPANY_ID = "SELECT id FROM companies WHERE domain = ?"
_SQL_INSERT_COMPANY = "INSERT INTO companies (domain, name) VALUES (?, ?) ON CONFLICT DO NOTHING"
_SQL_INSERT_CONTACT = ("INSERT INTO contacts (email, owner, marketing, do_not_track, company_pk, created_at) "
                       "VALUES (?, ?, 0, 0, ?, ?) ON CONFLICT DO NOTHING")
_SQL_CONTACT_ROW = "SELECT id, company_pk FROM contacts WHERE email = ?"
_SQL_PARENTS_THREAD = "SELECT thread_key FROM logged_emails WHERE message_id IN ({in}) LIMIT 1"
_LOGGED_COLUMNS = ("direction", "message_pk", "user", "message_id", "in_reply_to", "references", "thread_key",
                   "subject", "from_addr", "to_addr", "cc_addr", "date", "text", "html", "pinned",
                   "omitted_attachments", "created_at")
_SQL_INSERT_LOGGED = direct.insert_sql("logged_emails", _LOGGED_COLUMNS)
_SQL_DEALS_BY_ID = "SELECT kind, id FROM deals WHERE id IN ({in})"
_SQL_CONTACTS_WITH_DEALS = "SELECT DISTINCT contact_pk FROM deal_contacts WHERE contact_pk IN ({in})"
_SQL_RECENT_OPEN = ("SELECT deals.kind, deals.id FROM deals JOIN deal_contacts ON deal_contacts.deal_pk = deals.id "
                    "WHERE deal_contacts.contact_pk = ? AND deals.is_open IS 1 AND deals.kind = ? "
                    "ORDER BY deals.updated_at DESC, deals.id DESC LIMIT ?")
_SQL_INSERT_ASSOCIATION = direct.insert_sql("logged_associations", ("logged_pk", "kind", "target_pk"))
_SQL_ATTACHMENT_ID = "SELECT id FROM attachments WHERE sha256 = ?"
_SQL_INSERT_ATTACHMENT = direct.insert_sql("attachments", ("sha256", "size", "data"))
_SQL_INSERT_LOGGED_ATTACHMENT = direct.insert_sql("logged_attachments",
                                                  ("logged_pk", "attachment_pk", "filename", "content_type"))


def _log_email_sqlite(db: direct.Db, email: EmailToLog, now: datetime) -> int | None:
    wanted = list(email.contact_emails)
    existing = {e: (pk, owner, company) for e, pk, owner, company in
                direct.select_in(db, _SQL_CONTACTS_BY_EMAIL, wanted)}
    contacts: list[tuple[int, int | None]] = []
    owners = []
    for addr in wanted:
        found = existing.get(addr)
        if found is not None:
            pk, owner, company = found
            if owner is None and email.owner:
                owners.append((email.owner, pk))
            contacts.append((pk, company))
        elif may_create_contact(addr, email.create_contacts):
            contacts.append(_create_contact_sqlite(db, addr, email.owner, email.free_mail, now))
    if not contacts:
        return None
    if owners:
        db.executemany(_SQL_SET_OWNER, owners)
    parents = thread_parents(email)
    found_thread = None
    if parents:
        row = db.execute(_SQL_PARENTS_THREAD.format(**{"in": direct.in_list(len(parents))}), parents).fetchone()
        found_thread = row[0] if row else None
    values = _logged_values(email, thread_root(email, found_thread), now)
    values.update(date=direct.sqlite_time(email.date), created_at=direct.sqlite_time(now), pinned=0,
                  omitted_attachments=direct.json_text(values["omitted_attachments"]))
    logged = db.execute(_SQL_INSERT_LOGGED, [values[c] for c in _LOGGED_COLUMNS]).lastrowid
    deals: set[tuple[str, int]] = set()
    if email.associate is not None:
        known = set(direct.select_in(db, _SQL_DEALS_BY_ID, [i for _, i in email.associate]))
        deals = {pair for pair in email.associate if pair in known}
    else:
        pks = [pk for pk, _ in contacts]
        with_deals = {pk for (pk,) in direct.select_in(db, _SQL_CONTACTS_WITH_DEALS, pks)}
        for pk in pks:
            if pk in with_deals:
                for kind in ("deal", "ticket"):
                    deals |= set(db.execute(_SQL_RECENT_OPEN, (pk, kind, RECENT_OPEN_DEALS)).fetchall())
    db.executemany(_SQL_INSERT_ASSOCIATION, [(logged, kind, t) for kind, t in _associations(contacts, deals)])
    stored = []
    for filename, ctype, data in email.attachments:
        sha = hashlib.sha256(data).hexdigest()
        row = db.execute(_SQL_ATTACHMENT_ID, (sha,)).fetchone()
        apk = row[0] if row else db.execute(_SQL_INSERT_ATTACHMENT, (sha, len(data), data)).lastrowid
        stored.append((logged, apk, filename, ctype))
    if stored:
        db.executemany(_SQL_INSERT_LOGGED_ATTACHMENT, stored)
    return logged


def _create_contact_sqlite(db: direct.Db, email: str, owner: str | None, free_mail: frozenset[str],
                           now: datetime) -> tuple[int, int | None]:
    key = companies.company_domain(email.rpartition("@")[2], free_mail)
    company = None
    if key is not None:
        row = db.execute(_SQL_COMPANY_ID, (key,)).fetchone()
        if row is None:
            db.execute(_SQL_INSERT_COMPANY, (key, to_unicode(key)))
            row = db.execute(_SQL_COMPANY_ID, (key,)).fetchone()
        company = row[0]
    db.execute(_SQL_INSERT_CONTACT, (email, owner, company, direct.sqlite_time(now)))
    return tuple(db.execute(_SQL_CONTACT_ROW, (email,)).fetchone())


# -- the CRM jobs -----------------------------------------------------------------------------

@dataclass(frozen=True)
class LogJob:
    """A pending CRM job (one per logged message, committed with it) and what its message holds
    for logging: None where the message is gone; ``addresses`` are its recipients to log."""

    id: int
    message_pk: int
    message_id: str | None = None
    user: str | None = None
    raw: bytes | None = None
    log_associate: str | None = None
    accepted_at: datetime | None = None
    addresses: tuple[str, ...] = ()
    #: Where ``finish_job`` writes: the claiming transaction's connection, or (SQLite) the engine.
    _db: AsyncConnection | AsyncEngine | None = field(default=None, repr=False, compare=False)


@asynccontextmanager
async def next_job(engine: AsyncEngine) -> AsyncIterator[LogJob | None]:
    """The oldest pending CRM job, claimed for the block (None: there is none); ``finish_job``
    ends it and commits, and a block left without it (an exception) leaves the job pending.

    On PostgreSQL the claim is the job's row locked in a transaction until ``finish_job``'s commit
    (other workers skip it); on SQLite the job is read in one trip and the connection is free again
    at once (its one writer is never held while the message is parsed), and ``finish_job`` ends
    the job only if it is still pending."""
    if direct.usable(engine):
        job = await direct.call(engine, _next_job_sqlite)
        yield None if job is None else dataclasses.replace(job, _db=engine)
        return
    async with engine.connect() as conn:
        await conn.begin()
        try:
            yield await _next_job_core(conn)
        finally:
            if conn.in_transaction():
                await conn.rollback()


async def finish_job(job: LogJob, email: EmailToLog | None) -> Logged | None:
    """Log ``email`` (None: nothing to log) and mark the job done, and commit (on SQLite in one
    trip to the driver's thread)."""
    if isinstance(job._db, AsyncEngine):
        # Not waited to disk: a log lost with its commit leaves its job pending, done again.
        pk = await direct.transaction(job._db, _finish_job_sqlite, job.id, email, utcnow(), durable=False)
        return None if pk is None else Logged(pk)
    logged = None if email is None else await log_email(job._db, email)
    await job._db.execute(_JOB_DONE, {"job": job.id})
    await job._db.commit()
    return logged


def batches(engine: AsyncEngine) -> bool:
    """Whether ``next_jobs``/``finish_jobs`` serve this engine (SQLite: its one writer is never
    held between the claim and the log). Elsewhere ``next_job`` claims one row lock at a time."""
    return direct.usable(engine)


async def next_jobs(engine: AsyncEngine, limit: int) -> list[LogJob]:
    """Up to ``limit`` of the oldest pending CRM jobs and their messages, in one trip (SQLite);
    ``finish_jobs`` ends them."""
    return [dataclasses.replace(job, _db=engine) for job in await direct.call(engine, _next_jobs_sqlite, limit)]


async def finish_jobs(engine: AsyncEngine, work: list[tuple[LogJob, "EmailToLog | None"]]
                      ) -> list[Logged | None | Exception]:
    """Log each job's email and end the jobs in one commit (not waited to disk, as
    ``finish_job``'s): per job the logged email, None (nothing logged, or ended meanwhile) or the
    exception that failed it — a job that fails is done again alone, the others still commit."""
    if not work:
        return []
    now = utcnow()
    try:
        pks = await direct.transaction(engine, _finish_jobs_sqlite, work, now, durable=False)
        return [None if pk is None else Logged(pk) for pk in pks]
    except Exception:
        if len(work) == 1:
            raise
    results: list[Logged | None | Exception] = []
    for job, email in work:  # the batch failed as a whole: each alone, so one bad job fails alone
        try:
            results.append(await finish_job(job, email))
        except Exception as exc:
            results.append(exc)
    return results


async def job_failed(engine: AsyncEngine, job_id: int, max_attempts: int) -> None:
    """One more failed attempt of the job; at ``max_attempts`` it is given up (state failed)."""
    async with engine.begin() as conn:
        await conn.execute(_JOB_FAILED, {"job": job_id, "max": max_attempts})


_NEXT_JOB = (select(CrmJob.id, CrmJob.message_pk).where(CrmJob.state == "pending").order_by(CrmJob.id).limit(1)
             .with_for_update(skip_locked=True))
_MESSAGE_TO_LOG = (select(Message.message_id, Message.user, Message.raw, Message.log_associate, Message.accepted_at)
                   .where(Message.id == bindparam("pk")))
_ADDRESSES_TO_LOG = (select(Recipient.address).where(Recipient.message_pk == bindparam("pk"), Recipient.log.is_(True))
                     .order_by(Recipient.id))
_JOB_DONE = update(CrmJob).where(CrmJob.id == bindparam("job")).values(state="done")
_JOB_FAILED = update(CrmJob).where(CrmJob.id == bindparam("job")).values(
    attempts=CrmJob.attempts + 1, last_error="logging failed",
    state=case((CrmJob.attempts + 1 >= bindparam("max"), "failed"), else_=CrmJob.state))


async def _next_job_core(conn: AsyncConnection) -> LogJob | None:
    row = (await conn.execute(_NEXT_JOB)).first()
    if row is None:
        return None
    job_id, message_pk = row
    msg = (await conn.execute(_MESSAGE_TO_LOG, {"pk": message_pk})).first()
    if msg is None:
        return LogJob(job_id, message_pk, _db=conn)
    addresses = () if msg.raw is None else \
        tuple((await conn.execute(_ADDRESSES_TO_LOG, {"pk": message_pk})).scalars())
    return LogJob(job_id, message_pk, *msg, addresses=addresses, _db=conn)


_SQL_MESSAGE_TO_LOG = 'SELECT message_id, "user", raw, log_associate, accepted_at FROM messages WHERE id = ?'
_SQL_ADDRESSES_TO_LOG = "SELECT address FROM recipients WHERE message_pk = ? AND log IS 1 ORDER BY id"
_SQL_JOB_DONE = "UPDATE crm_jobs SET state = 'done' WHERE id = ? AND state = 'pending'"


def _next_job_sqlite(db: direct.Db) -> LogJob | None:
    jobs = _next_jobs_sqlite(db, 1)
    return jobs[0] if jobs else None


def _next_jobs_sqlite(db: direct.Db, limit: int) -> list[LogJob]:
    jobs = []
    for job_id, message_pk in db.execute(_SQL_NEXT_JOBS, (limit,)).fetchall():
        msg = db.execute(_SQL_MESSAGE_TO_LOG, (message_pk,)).fetchone()
        if msg is None:
            jobs.append(LogJob(job_id, message_pk))
            continue
        message_id, user, raw, log_associate, accepted_at = msg
        addresses = () if raw is None else \
            tuple(a for (a,) in db.execute(_SQL_ADDRESSES_TO_LOG, (message_pk,)).fetchall())
        jobs.append(LogJob(job_id, message_pk, message_id, user, raw, log_associate,
                           direct.parse_time(accepted_at), addresses))
    return jobs


_SQL_NEXT_JOBS = "SELECT id, message_pk FROM crm_jobs WHERE state = 'pending' ORDER BY id LIMIT ?"


def _finish_jobs_sqlite(db: direct.Db, work: list[tuple[LogJob, EmailToLog | None]], now: datetime
                        ) -> list[int | None]:
    return [_finish_job_sqlite(db, job.id, email, now) for job, email in work]


def _finish_job_sqlite(db: direct.Db, job_id: int, email: EmailToLog | None, now: datetime) -> int | None:
    if db.execute(_SQL_JOB_DONE, (job_id,)).rowcount == 0:
        return None  # another process has ended it meanwhile
    return None if email is None else _log_email_sqlite(db, email, now)
# -- logged emails ----------------------------------------------------------------------------

async def timeline(session: AsyncSession, contact_pk: int) -> list[LoggedEmail]:
    return list((await session.scalars(
        select(LoggedEmail).join(LoggedAssociation, LoggedAssociation.logged_pk == LoggedEmail.id)
        .where(LoggedAssociation.kind == "contact", LoggedAssociation.target_pk == contact_pk)
        .order_by(LoggedEmail.pinned.desc(), LoggedEmail.date.desc(), LoggedEmail.id.desc()))).all())


async def logged_email(session: AsyncSession, pk: int, bodies: bool = False) -> LoggedEmail | None:
    q = select(LoggedEmail).where(LoggedEmail.id == pk)
    if bodies:
        q = q.options(undefer(LoggedEmail.text), undefer(LoggedEmail.html))
    return (await session.scalars(q)).first()


async def thread(session: AsyncSession, thread_key: str) -> list[LoggedEmail]:
    return list((await session.scalars(select(LoggedEmail).where(LoggedEmail.thread_key == thread_key)
                                       .order_by(LoggedEmail.date, LoggedEmail.id))).all())


async def attachments_of(session: AsyncSession, logged_pks: list[int]) -> dict[int, list[tuple]]:
    if not logged_pks:
        return {}
    rows = await session.execute(
        select(LoggedAttachment.logged_pk, LoggedAttachment.id, LoggedAttachment.filename,
               LoggedAttachment.content_type, Attachment.size)
        .join(Attachment, Attachment.id == LoggedAttachment.attachment_pk)
        .where(LoggedAttachment.logged_pk.in_(logged_pks)).order_by(LoggedAttachment.id))
    out: dict[int, list[tuple]] = {}
    for lp, aid, fn, ct, size in rows.all():
        out.setdefault(lp, []).append((aid, fn, ct, size))
    return out


async def attachment_bytes(session: AsyncSession, logged_attachment_pk: int) -> tuple[str, str, bytes] | None:
    row = (await session.execute(
        select(LoggedAttachment.filename, LoggedAttachment.content_type, Attachment.data)
        .join(Attachment, Attachment.id == LoggedAttachment.attachment_pk)
        .where(LoggedAttachment.id == logged_attachment_pk))).first()
    return tuple(row) if row else None


async def delete_unreferenced_attachments(session: AsyncSession) -> int:
    used = select(LoggedAttachment.attachment_pk)
    res = await session.execute(delete(Attachment).where(Attachment.id.not_in(used)))
    return res.rowcount or 0


async def delete_logged_email(session: AsyncSession, pk: int) -> None:
    await session.execute(delete(LoggedAssociation).where(LoggedAssociation.logged_pk == pk))
    await session.execute(delete(LoggedAttachment).where(LoggedAttachment.logged_pk == pk))
    await session.execute(delete(LoggedEmail).where(LoggedEmail.id == pk))
    await delete_unreferenced_attachments(session)


async def erase_contact(session: AsyncSession, email: str) -> bool:
    """GDPR erase: the contact, its events and tracking data, the logged emails where it was the
    only contact, and attachments no longer referenced. Addresses in other people's logged headers
    and on Never Log lists stay (they exist to remember it)."""
    email = email.lower()
    contact = await get_contact(session, email)
    rcpt_ids = list((await session.scalars(select(Recipient.id).where(func.lower(Recipient.address) == email))).all())
    if rcpt_ids:
        await session.execute(delete(Event).where(Event.recipient_pk.in_(rcpt_ids)))
        await session.execute(update(Recipient).where(Recipient.id.in_(rcpt_ids))
                              .values(token=None, address="erased@invalid", reasons=["erased"], render_note=None,
                                      last_reply=None)
                              .execution_options(synchronize_session=False))
    if contact is None:
        return bool(rcpt_ids)
    logged = list((await session.scalars(select(LoggedAssociation.logged_pk).where(
        LoggedAssociation.kind == "contact", LoggedAssociation.target_pk == contact.id))).all())
    for lp in logged:
        others = (await session.scalar(select(func.count()).select_from(LoggedAssociation).where(
            LoggedAssociation.logged_pk == lp, LoggedAssociation.kind == "contact",
            LoggedAssociation.target_pk != contact.id))) or 0
        if others == 0:
            await session.execute(delete(LoggedAssociation).where(LoggedAssociation.logged_pk == lp))
            await session.execute(delete(LoggedAttachment).where(LoggedAttachment.logged_pk == lp))
            await session.execute(delete(LoggedEmail).where(LoggedEmail.id == lp))
        else:
            await session.execute(delete(LoggedAssociation).where(
                LoggedAssociation.logged_pk == lp, LoggedAssociation.kind == "contact",
                LoggedAssociation.target_pk == contact.id))
    await session.execute(delete(DealContact).where(DealContact.contact_pk == contact.id))
    await session.execute(delete(Contact).where(Contact.id == contact.id))
    await delete_unreferenced_attachments(session)
    return True


class NeverLogRefused(ValueError):
    """A Never Log change that is refused; str() says why, for the CLI and the API."""


async def never_log_change(session: AsyncSession, *, action: str, scope: str, user: str,
                           raw_entries: list[str], config_entries: tuple[str, ...]) -> list[str]:
    """Add or remove entries of one list (team: user ""). Config-managed entries are read-only;
    a list holds at most 500 entries, config and database together."""
    from core.neverlog import MAX_ENTRIES, EntryError, normalise_entry
    if not raw_entries:
        raise NeverLogRefused("no entries given")
    try:
        entries = list(dict.fromkeys(normalise_entry(e) for e in raw_entries))
    except EntryError as e:
        raise NeverLogRefused(str(e)) from None
    managed = set(config_entries)
    db = set(await never_log_db_entries(session, scope, user))
    if action == "add":
        new = [e for e in entries if e not in db and e not in managed]
        total = len(db | managed) + len(new)
        if total > MAX_ENTRIES:
            raise NeverLogRefused(f"the {scope} Never Log list holds at most {MAX_ENTRIES} entries: it has "
                                  f"{len(db | managed)}, adding {len(new)} would make {total}")
        return await never_log_add(session, scope, user, new)
    blocked = [e for e in entries if e in managed]
    if blocked:
        raise NeverLogRefused(f"{blocked[0]} is managed by the config file ({'never_log.team' if scope == 'team' else 'users.never_log'}); "
                              "remove it there")
    missing = [e for e in entries if e not in db]
    if missing:
        raise NeverLogRefused(f"{missing[0]} is not on the list")
    await never_log_remove(session, scope, user, entries)
    return entries
