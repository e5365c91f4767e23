"""CRM queries: contacts, companies, deals, Never Log lists, logged emails and their timelines,
and the GDPR erase. Each function takes the session first; the caller owns the transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, bindparam, case, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import undefer

from storage import direct
from storage.engine import connection_of
from storage.models import (Attachment, Company, Contact, Deal, DealContact, Event, LoggedAssociation,
                            LoggedAttachment, LoggedEmail, NeverLog, Recipient, UTCDateTime, utcnow)
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


def _contact_facts_sqlite(db: direct.Db, emails: list[str]) -> list[tuple[str, str | None, bool]]:
    return [(e, basis, bool(dnt)) for e, basis, dnt in direct.select_in(
        db, "SELECT email, legal_basis, do_not_track FROM contacts WHERE email IN ({in})", emails)]


#: Built once: a statement object reused keeps its cache key (SQLAlchemy memoizes it).
_CONTACT_FACTS = (select(Contact.email, Contact.legal_basis, Contact.do_not_track)
                  .where(Contact.email.in_(bindparam("emails", expanding=True))))


async def get_contact(session: AsyncSession, email: str) -> Contact | None:
    return (await session.scalars(select(Contact).where(Contact.email == email.lower()))).first()


def _insert_ignoring_duplicates(session: AsyncSession, model, values: dict):
    """INSERT … ON CONFLICT DO NOTHING: another process (the CRM logger, the inbound listener, a
    second worker) may create the same contact or company at the same moment."""
    ins = postgresql.insert(model) if session.bind.dialect.name == "postgresql" else sqlite.insert(model)
    return session.execute(ins.values(**values).on_conflict_do_nothing())


async def company_for(session: AsyncSession, domain: str,
                      free_mail: frozenset[str] = frozenset()) -> Company | None:
    """The company of an address at ``domain``: one per registrable domain (``eu.acme.com`` is
    ``acme.com``), IDNA-normalised; none for free mail (the shipped list and ``free_mail``)."""
    key = companies.company_domain(domain, free_mail)
    if key is None:
        return None
    company = (await session.scalars(select(Company).where(Company.domain == key))).first()
    if company is None:
        await _insert_ignoring_duplicates(session, Company, {"domain": key, "name": to_unicode(key)})
        company = (await session.scalars(select(Company).where(Company.domain == key))).one()
    return company


async def ensure_contact(session: AsyncSession, email: str, owner: str | None, create: bool,
                         free_mail: frozenset[str] = frozenset(), missing: bool = False) -> Contact | None:
    """The contact for ``email``; created (owner, marketing false, company by registrable domain)
    when allowed — never for a bounce sender (``MAILER-DAEMON@…``, ``postmaster@…``) or no address.
    ``missing``: the caller has just looked and found none (``contacts_by_email``)."""
    email = email.lower()
    contact = None if missing else await get_contact(session, email)
    if contact is not None:
        if contact.owner is None and owner:
            contact.owner = owner  # an existing owner is kept
        return contact
    if not create or is_system(email) or "@" not in email:
        return None
    company = await company_for(session, email.rpartition("@")[2], free_mail)
    await _insert_ignoring_duplicates(session, Contact, {
        "email": email, "owner": owner, "marketing": False, "do_not_track": False,
        "company_pk": company.id if company else None, "created_at": utcnow()})
    return await get_contact(session, email)


async def contacts_by_email(session: AsyncSession, emails: list[str]) -> list[Contact]:
    """The existing contacts among these (lower-case) addresses, in one query."""
    if not emails:
        return []
    return list((await session.scalars(select(Contact).where(Contact.email.in_(emails)))).all())


async def contacts_with_deals(session: AsyncSession, contact_pks: list[int]) -> set[int]:
    """Which of these contacts are linked to any deal or ticket (one query; the others need no
    look-up of their open deals)."""
    if not contact_pks:
        return set()
    return set((await session.scalars(select(DealContact.contact_pk).distinct()
                                      .where(DealContact.contact_pk.in_(contact_pks)))).all())


async def company_domain(session: AsyncSession, company_pk: int | None) -> str | None:
    if company_pk is None:
        return None
    return (await session.scalars(select(Company.domain).where(Company.id == company_pk))).first()


async def recent_open_deals(session: AsyncSession, contact_pk: int, limit: int = 3) -> list[Deal]:
    """A contact's most recent open deals and tickets (each kind counted on its own)."""
    out: list[Deal] = []
    for kind in ("deal", "ticket"):
        rows = (await session.scalars(
            select(Deal).join(DealContact, DealContact.deal_pk == Deal.id)
            .where(DealContact.contact_pk == contact_pk, Deal.is_open.is_(True), Deal.kind == kind)
            .order_by(Deal.updated_at.desc(), Deal.id.desc()).limit(limit))).all()
        out += rows
    return out


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


# -- logged emails ----------------------------------------------------------------------------

async def store_attachment(session: AsyncSession, sha256: str, data: bytes) -> int:
    existing = (await session.scalars(select(Attachment.id).where(Attachment.sha256 == sha256))).first()
    if existing is not None:
        return existing
    a = Attachment(sha256=sha256, size=len(data), data=data)
    session.add(a)
    await session.flush()
    return a.id


async def thread_key_for(session: AsyncSession, message_id: str, in_reply_to: str | None,
                         references: list[str]) -> str:
    """The root Message-ID of the thread: a logged parent's thread, else References' first."""
    parents = [p for p in ([in_reply_to] if in_reply_to else []) + list(reversed(references)) if p]
    if parents:
        found = (await session.scalars(select(LoggedEmail.thread_key)
                                       .where(LoggedEmail.message_id.in_(parents)).limit(1))).first()
        if found:
            return found
        return references[0] if references else parents[0]
    return message_id


async def associate(session: AsyncSession, logged_pk: int, kind: str, target_pks: set[int]) -> None:
    for t in sorted(target_pks):
        session.add(LoggedAssociation(logged_pk=logged_pk, kind=kind, target_pk=t))


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
