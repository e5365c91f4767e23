"""Data migrations, on SQLite and PostgreSQL: the database is brought to the revision before, old
rows are written as the old code wrote them, and the migration is run (twice: idempotent).

- 0009 (issue 17): Never Log entries re-normalised with today's rules where that gives another
  valid form; the IDNA 2003 ``*@strasse.de`` (typed as ``*@straße.de`` or not, the typed text
  was not kept) is left alone; ``core.neverlog.matches_legacy`` reads such old entries with both
  meanings.
- 0010 (issue 21): companies made per subdomain merged into their registrable domain's company.
"""

from __future__ import annotations

from datetime import datetime, timezone

from alembic import command
from sqlalchemy import select, text

from core import neverlog
from storage.engine import make_engine
from storage.migrate import alembic_config, upgrade
from storage.models import Company, Contact, LoggedAssociation, LoggedEmail, NeverLog

OLD = datetime(2026, 6, 1, tzinfo=timezone.utc)


async def _downgrade(engine, revision: str) -> None:
    def run(conn):
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
    async with engine.begin() as conn:
        await conn.run_sync(run)


async def _rows(engine, sql: str):
    async with engine.connect() as conn:
        return [tuple(r) for r in (await conn.execute(text(sql))).all()]


async def _at(db_url: str, revision: str, rows: list):
    engine = make_engine(db_url)
    await upgrade(engine, revision)
    from sqlalchemy.ext.asyncio import async_sessionmaker
    async with async_sessionmaker(engine, expire_on_commit=False)() as s:
        for group in rows:
            s.add_all(group)
            await s.flush()
        await s.commit()
    return engine


# -- 0009: Never Log ------------------------------------------------------------------------------

async def test_0009_renormalises_never_log_entries_and_leaves_the_ambiguous_alone(db_url):
    stored = [  # (scope, user, entry) as they may be stored
        ("team", "", "*@strasse.de"),             # IDNA 2003 of *@straße.de, or a real strasse.de: left
        ("team", "", "*@xn--mnchen-3ya.de"),      # münchen.de: the same under both: left
        ("team", "", "Bob@Example.COM"),          # not in its normal form: rewritten
        ("user", "alice", "*@Straße.de"),         # written unnormalised (by hand): IDNA 2008 now
        ("user", "alice", "*@XN--STRAE-OQA.de"),  # the same entry again in another spelling: one kept
        ("user", "alice", "*@xn--n3h.net"),       # ☃.net: IDNA 2003 allowed it, IDNA 2008 refuses: left
        ("user", "bob", "bob@example.com"),       # already normal: left
    ]
    engine = await _at(db_url, "0008", [[NeverLog(scope=sc, user=u, entry=e, created_at=OLD) for sc, u, e in stored]])
    try:
        await upgrade(engine, "0009")
        want = [("team", "", "*@strasse.de"), ("team", "", "*@xn--mnchen-3ya.de"), ("team", "", "bob@example.com"),
                ("user", "alice", "*@xn--n3h.net"), ("user", "alice", "*@xn--strae-oqa.de"),
                ("user", "bob", "bob@example.com")]
        sql = 'SELECT scope, "user", entry FROM never_log ORDER BY scope, "user", entry'
        assert await _rows(engine, sql) == want
        await _downgrade(engine, "0008")  # nothing undone
        await upgrade(engine, "0009")     # and nothing changed the second time
        assert await _rows(engine, sql) == want
        await upgrade(engine)
    finally:
        await engine.dispose()


def test_old_idna2003_entries_read_with_both_meanings_only_where_asked():
    old = {"*@strasse.de", "ann@xn--4xa.gr"}  # stored by IDNA 2003: *@straße.de?, ann@ς.gr?
    # matches: an entry means the domain IDNA 2008 names (issue 17), never another one
    assert not neverlog.matches("x@straße.de", old) and neverlog.matches("x@strasse.de", old)
    # matches_legacy: an old entry also covers the domain it may have been typed as
    assert neverlog.matches_legacy("x@straße.de", old) and neverlog.matches_legacy("x@xn--strae-oqa.de", old)
    assert neverlog.matches_legacy("x@STRASSE.de", old)
    assert neverlog.matches_legacy("ann@ς.gr", old) and not neverlog.matches_legacy("bob@ς.gr", old)
    # only in that direction, only for deviation characters
    assert not neverlog.matches_legacy("x@strasse.de", {neverlog.normalise_entry("*@straße.de")})
    assert not neverlog.matches_legacy("x@münchen.de", {"*@munchen.de", "*@strasse.de"})
    assert neverlog.idna2003_form("xn--strae-oqa.de") == "strasse.de"
    assert neverlog.idna2003_form("xn--mnchen-3ya.de") is None and neverlog.idna2003_form("strasse.de") is None


# -- 0010: companies ------------------------------------------------------------------------------

async def test_0010_merges_subdomain_companies_into_the_registrable_domain(db_url):
    companies = [Company(id=1, domain="eu.acme.com", name="eu.acme.com"),
                 Company(id=2, domain="acme.com", name="ACME Inc."),
                 Company(id=3, domain="us.acme.com", name="ACME US"),
                 Company(id=4, domain="sales.eu.beta.co.uk", name="sales.eu.beta.co.uk"),
                 Company(id=5, domain="beta.co.uk", name="beta.co.uk"),
                 Company(id=6, domain="mail.gamma.de", name="mail.gamma.de"),  # alone, under a subdomain
                 Company(id=7, domain="delta.org", name="Delta"),               # already right
                 Company(id=8, domain="münchen.de", name="münchen.de"),        # stored as written
                 Company(id=9, domain="office.xn--mnchen-3ya.de", name="Stadt München")]
    contacts = [Contact(id=10, email="ann@eu.acme.com", company_pk=1), Contact(id=11, email="bob@acme.com", company_pk=2),
                Contact(id=12, email="cy@us.acme.com", company_pk=3), Contact(id=13, email="di@sales.eu.beta.co.uk",
                                                                              company_pk=4),
                Contact(id=14, email="ed@mail.gamma.de", company_pk=6), Contact(id=15, email="fi@delta.org", company_pk=7),
                Contact(id=16, email="gu@münchen.de", company_pk=8), Contact(id=17, email="ha@gmail.com", company_pk=None)]
    logged = [LoggedEmail(id=20 + i, direction="outgoing", message_id=f"<m{i}@x>", thread_key=f"<m{i}@x>")
              for i in range(4)]
    assoc = [LoggedAssociation(logged_pk=20, kind="company", target_pk=1),   # eu.acme only: re-pointed
             LoggedAssociation(logged_pk=21, kind="company", target_pk=1),   # eu.acme and acme: one kept
             LoggedAssociation(logged_pk=21, kind="company", target_pk=2),
             LoggedAssociation(logged_pk=22, kind="company", target_pk=1),   # eu.acme and us.acme: one
             LoggedAssociation(logged_pk=22, kind="company", target_pk=3),
             LoggedAssociation(logged_pk=22, kind="contact", target_pk=1),   # a contact 1 (none): untouched
             LoggedAssociation(logged_pk=23, kind="company", target_pk=6)]
    engine = await _at(db_url, "0009", [companies, contacts, logged, assoc])
    try:
        await upgrade(engine, "0010")
        want_companies = [(2, "acme.com", "ACME Inc."), (5, "beta.co.uk", "beta.co.uk"), (6, "gamma.de", "gamma.de"),
                          (7, "delta.org", "Delta"), (8, "xn--mnchen-3ya.de", "münchen.de")]
        want_contacts = [(10, 2), (11, 2), (12, 2), (13, 5), (14, 6), (15, 7), (16, 8), (17, None)]
        want_assoc = [(20, "company", 2), (21, "company", 2), (22, "company", 2), (22, "contact", 1),
                      (23, "company", 6)]
        for _ in range(2):  # the second time (down to 0009, whose downgrade undoes nothing, and up): no change
            assert await _rows(engine, "SELECT id, domain, name FROM companies ORDER BY id") == want_companies
            assert await _rows(engine, "SELECT id, company_pk FROM contacts ORDER BY id") == want_contacts
            assert await _rows(engine, "SELECT logged_pk, kind, target_pk FROM logged_associations "
                                       "ORDER BY logged_pk, kind, target_pk") == want_assoc
            await _downgrade(engine, "0009")
            await upgrade(engine, "0010")
        # new contacts find the merged company (storage.crm groups by registrable domain)
        from sqlalchemy.ext.asyncio import async_sessionmaker
        from storage import crm
        async with async_sessionmaker(engine, expire_on_commit=False)() as s:
            await crm.ensure_contact(s, "jo@de.acme.com", "alice", True)
            await s.commit()
        assert await _rows(engine, "SELECT company_pk FROM contacts WHERE email = 'jo@de.acme.com'") == [(2,)]
    finally:
        await engine.dispose()
