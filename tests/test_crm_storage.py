"""The CRM's and the webhooks' storage functions on their own (SQLite and PostgreSQL), and the CRM
logger's single-trip SQLite path against the SQLAlchemy Core path: the same rows, table by table."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import insert, select, text

from core.events import Event, EventType
from storage import crm, direct, events as ev, webhooks
from storage.engine import make_engine, make_sessionmaker
from storage.migrate import upgrade
from storage.models import (Company, Contact, CrmJob, Deal, DealContact, Message, Recipient,
                            WebhookCursor)

T0 = datetime(2026, 11, 22, 9, 30, 15, 250, tzinfo=timezone.utc)
NOW = datetime(2026, 11, 22, 9, 31, tzinfo=timezone.utc)

#: Every table the CRM logger writes or reads, with the order its rows are compared in.
TABLES = {"companies": "id", "contacts": "id", "deals": "id", "deal_contacts": "deal_pk, contact_pk",
          "logged_emails": "id", "logged_associations": "logged_pk, kind, target_pk", "attachments": "id",
          "logged_attachments": "id", "crm_jobs": "id"}


def email(**kw) -> crm.EmailToLog:
    base = dict(direction="outgoing", message_pk=None, user="alice", message_id="<m1@example.com>",
                in_reply_to=None, references=(), subject="Quote", from_="Alice <alice@example.com>",
                to="carol@acme.test", cc="", date=T0, text="Hello", html="<p>Hello</p>",
                contact_emails=("carol@acme.test",), owner="alice", create_contacts=True)
    base.update(kw)
    return crm.EmailToLog(**base)


async def _seed(engine) -> dict[str, int]:
    """Companies, contacts (one without an owner), deals and tickets (more open ones than are
    used, a closed one), and two spooled messages with their CRM jobs."""
    async with engine.begin() as conn:
        acme = (await conn.execute(insert(Company).values(domain="acme.test", name="acme.test"))).inserted_primary_key[0]
        carol = (await conn.execute(insert(Contact).values(email="carol@acme.test", owner=None, company_pk=acme,
                                                           created_at=T0))).inserted_primary_key[0]
        dave = (await conn.execute(insert(Contact).values(email="dave@other.test", owner="bob",
                                                          created_at=T0))).inserted_primary_key[0]
        deals = []
        for i, (kind, is_open) in enumerate([("deal", True)] * 4 + [("deal", False), ("ticket", True)]):
            deals.append((await conn.execute(insert(Deal).values(
                kind=kind, name=f"{kind} {i}", is_open=is_open, updated_at=T0 + timedelta(minutes=i)))
                          ).inserted_primary_key[0])
        await conn.execute(insert(DealContact), [{"deal_pk": d, "contact_pk": carol} for d in deals])
        ids = {"acme": acme, "carol": carol, "dave": dave, "deal0": deals[0], "ticket": deals[5]}
        for n, (raw, log) in enumerate([(_raw(), True), (b"Subject: none logged\r\n\r\nx", False)], 1):
            mpk = (await conn.execute(insert(Message).values(
                message_id=f"<spooled{n}@example.com>", user="alice", mail_from="alice@example.com", raw=raw,
                size=len(raw), log=True, log_associate=None, accepted_at=T0))).inserted_primary_key[0]
            await conn.execute(insert(Recipient), [
                {"message_pk": mpk, "address": "Carol@Acme.test", "log": log, "status": "sent", "reasons": []},
                {"message_pk": mpk, "address": "erin@newco.test", "log": log, "status": "sent", "reasons": []},
                {"message_pk": mpk, "address": "frank@gmail.com", "log": False, "status": "sent", "reasons": []}])
            await conn.execute(insert(CrmJob).values(message_pk=mpk, state="pending", created_at=T0, attempts=0))
            ids[f"message{n}"] = mpk
    return ids


def _raw() -> bytes:
    return (b"From: Alice <alice@example.com>\r\nTo: carol@acme.test, erin@newco.test\r\n"
            b"Subject: Spooled\r\nMessage-ID: <spooled1@example.com>\r\n\r\nHi\r\n")


async def _scenario(url: str) -> dict[str, list[tuple]]:
    """Every storage function of the CRM logger, on one database; returns every stored row."""
    engine = make_engine(url)
    try:
        await upgrade(engine)
        ids = await _seed(engine)
        sm = make_sessionmaker(engine)
        pdf = b"%PDF-1.4 quote"
        # In a session's transaction (the inbound listener's way): an existing contact without an
        # owner gets one, a new contact and its company are created, free mail gets no company,
        # each contact's three most recent open deals and its ticket, one attachment stored once.
        async with sm() as s, s.begin():
            first = await crm.log_email(s, email(
                contact_emails=("carol@acme.test", "erin@newco.test", "gina@gmail.com", "dave@other.test"),
                attachments=(("quote.pdf", "application/pdf", pdf), ("copy.pdf", "application/pdf", pdf)),
                omitted_attachments=({"filename": "big.zip", "size": 9, "reason": "too big"},)))
        assert first is not None
        async with sm() as s, s.begin():
            # A reply in the thread, to the listed deal and ticket only (999 does not exist).
            second = await crm.log_email(s, email(
                direction="incoming", message_id="<m2@acme.test>", in_reply_to="<m1@example.com>",
                references=("<root@example.com>", "<m1@example.com>"), contact_emails=("erin@newco.test",),
                associate=(("deal", ids["deal0"]), ("ticket", ids["ticket"]), ("deal", 999))))
            # Nobody to log to: no contact may be created (not allowed, a bounce sender, no address).
            assert await crm.log_email(s, email(contact_emails=("nobody@acme.test",), create_contacts=False)) is None
            assert await crm.log_email(s, email(contact_emails=("mailer-daemon@acme.test", "nobody"))) is None
            # A reply to a message never logged: its thread is References' first.
            third = await crm.log_email(s, email(message_id="<m3@x>", in_reply_to="<unknown@x>",
                                                 references=("<r1@x>", "<r2@x>"), contact_emails=("erin@newco.test",)))
        assert second is not None and third is not None and second.id > first.id
        # The CRM jobs: the first logs its message, the second (no recipient to log) is done with
        # nothing logged, then there is none.
        async with crm.next_job(engine) as job:
            assert job is not None and job.message_pk == ids["message1"] and job.raw == _raw()
            assert job.addresses == ("Carol@Acme.test", "erin@newco.test") and job.accepted_at == T0
            assert job.message_id == "<spooled1@example.com>" and job.user == "alice"
            logged = await crm.finish_job(job, email(message_pk=job.message_pk, message_id=job.message_id,
                                                     contact_emails=("carol@acme.test", "erin@newco.test")))
        assert logged is not None
        async with crm.next_job(engine) as job:
            assert job is not None and job.message_pk == ids["message2"] and job.addresses == ()
            assert await crm.finish_job(job, None) is None
        async with crm.next_job(engine) as job:
            assert job is None
        # A job that fails: counted, given up at the limit.
        async with engine.begin() as conn:
            await conn.execute(insert(CrmJob).values(message_pk=ids["message2"], state="pending", created_at=T0,
                                                     attempts=0))
        failed = None
        with pytest.raises(RuntimeError, match="parse failed"):
            async with crm.next_job(engine) as job:
                failed = job.id
                raise RuntimeError("parse failed")  # before finish_job: nothing written, still pending
        with pytest.raises(RuntimeError, match="too late"):
            async with crm.next_job(engine) as job:
                assert job.id == failed
                await crm.finish_job(job, email(contact_emails=("hank@acme.test",)))
                raise RuntimeError("too late")  # after finish_job: logged and done
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE crm_jobs SET state = 'pending' WHERE id = :id"), {"id": failed})
        for _ in range(2):
            await crm.job_failed(engine, failed, 2)
        rows = {}
        async with engine.connect() as conn:
            for table, order in TABLES.items():
                rows[table] = [tuple(r) for r in (await conn.execute(text(f"SELECT * FROM {table} ORDER BY {order}")))]
        return rows
    finally:
        await engine.dispose()


def _check(rows: dict[str, list[tuple]]) -> None:
    companies = {r[1] for r in rows["companies"]}
    assert companies == {"acme.test", "newco.test"}  # gmail.com is free mail
    contacts = {r[1]: r[2] for r in rows["contacts"]}  # email -> owner
    assert contacts == {"carol@acme.test": "alice", "dave@other.test": "bob", "erin@newco.test": "alice",
                        "gina@gmail.com": "alice", "hank@acme.test": "alice"}
    logged = {r[0]: r for r in rows["logged_emails"]}
    assert len(logged) == 5
    threads = [r[7] for r in rows["logged_emails"]]  # thread_key
    assert threads == ["<m1@example.com>", "<m1@example.com>", "<r1@x>", "<spooled1@example.com>",
                       "<m1@example.com>"]
    kinds = {}
    for lp, kind, _ in rows["logged_associations"]:
        kinds.setdefault(lp, []).append(kind)
    first, second = sorted(logged)[:2]
    assert sorted(kinds[first]) == ["company"] * 2 + ["contact"] * 4 + ["deal"] * 3 + ["ticket"]
    assert sorted(kinds[second]) == ["company", "contact", "deal", "ticket"]
    assert len(rows["attachments"]) == 1 and len(rows["logged_attachments"]) == 2
    states = [(r[2], r[4]) for r in rows["crm_jobs"]]  # state, attempts
    assert states == [("done", 0), ("done", 0), ("failed", 2)]


async def test_the_crm_loggers_functions_on_each_database(db_url, monkeypatch):
    monkeypatch.setattr(crm, "utcnow", lambda: NOW)
    _check(await _scenario(db_url))


async def test_sqlites_single_trip_path_stores_the_rows_sqlalchemy_core_stores(tmp_path, monkeypatch):
    """On SQLite the CRM logger's reads and writes for one message run as plain functions on the
    driver's thread: every stored value must be the one the Core statements store."""
    monkeypatch.setattr(crm, "utcnow", lambda: NOW)
    fast = await _scenario(f"sqlite+aiosqlite:///{tmp_path}/direct.db")
    with direct.disabled():
        core = await _scenario(f"sqlite+aiosqlite:///{tmp_path}/core.db")
    _check(core)
    for table in TABLES:
        assert fast[table] == core[table], table


async def test_on_sqlite_jobs_are_claimed_and_logged_a_batch_at_a_time_and_a_bad_one_fails_alone(tmp_path):
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/batch.db")
    try:
        await upgrade(engine)
        ids = await _seed(engine)
        assert crm.batches(engine)
        jobs = await crm.next_jobs(engine, 8)
        assert [j.message_pk for j in jobs] == [ids["message1"], ids["message2"]]
        assert jobs[0].addresses == ("Carol@Acme.test", "erin@newco.test") and jobs[1].addresses == ()
        assert [j.message_pk for j in await crm.next_jobs(engine, 1)] == [ids["message1"]]
        bad = email(message_pk=jobs[1].message_pk, subject=object())  # no database can store it
        good = email(message_pk=jobs[0].message_pk, contact_emails=("carol@acme.test",))
        outcome = await crm.finish_jobs(engine, [(jobs[0], good), (jobs[1], bad)])
        assert isinstance(outcome[0], crm.Logged) and isinstance(outcome[1], Exception)
        # The good one is logged and done; the bad one is still pending, nothing of it stored.
        assert [j.message_pk for j in await crm.next_jobs(engine, 8)] == [ids["message2"]]
        assert await crm.finish_jobs(engine, [(jobs[1], None)]) == [None]
        assert await crm.next_jobs(engine, 8) == []
        async with engine.connect() as conn:
            logged = (await conn.execute(text("SELECT message_pk FROM logged_emails"))).scalars().all()
        assert logged == [ids["message1"]]
    finally:
        await engine.dispose()


async def test_the_relays_contact_look_up_answers_on_one_held_connection_and_recovers(db_url):
    from storage.engine import make_read_engine
    engine = make_engine(db_url)
    reader_engine = make_read_engine(db_url, engine)
    try:
        await upgrade(engine)
        await _seed(engine)
        facts = crm.FactsReader(reader_engine)
        for _ in range(3):
            assert sorted(await facts({"carol@acme.test", "dave@other.test", "nobody@x.test"})) == [
                ("carol@acme.test", None, False), ("dave@other.test", None, False)]
        if direct.usable(reader_engine):
            held = facts._conn
            assert held is not None and not held.in_transaction()  # no snapshot pinned between calls
            await held.close()  # a broken connection: the call fails, the next opens another
            with pytest.raises(Exception):
                await facts({"carol@acme.test"})
            assert await facts({"carol@acme.test"}) == [("carol@acme.test", None, False)]
            assert facts._conn is not held
        await facts.close()
    finally:
        if reader_engine is not engine:
            await reader_engine.dispose()
        await engine.dispose()


async def test_ensure_contact_creates_once_with_its_company(db_url):
    engine = make_engine(db_url)
    try:
        await upgrade(engine)
        sm = make_sessionmaker(engine)
        async with sm() as s, s.begin():
            c = await crm.ensure_contact(s, "Ivy@EU.Acme.test", "alice", create=True)
            assert c.email == "ivy@eu.acme.test" and c.owner == "alice"
            assert await crm.company_domain(s, c.company_pk) == "acme.test"
            assert await crm.ensure_contact(s, "postmaster@acme.test", "alice", create=True) is None
            assert await crm.ensure_contact(s, "jo@acme.test", "alice", create=False) is None
        async with sm() as s, s.begin():
            again = await crm.ensure_contact(s, "ivy@eu.acme.test", "bob", create=True)
            assert again.id == c.id and again.owner == "alice"  # an existing owner is kept
            assert len((await s.scalars(select(Company))).all()) == 1
    finally:
        await engine.dispose()


async def _visible(sm, cursor, timeout: float = 15.0) -> list[Event]:
    """The events after ``cursor`` once there are any: on PostgreSQL an event is listed once every
    older transaction of the cluster has ended (``storage.events.events_after``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (found := await webhooks.events_after(sm, cursor, 10)) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return found


async def test_webhook_cursor_claim_lease_and_release(db_url):
    engine = make_engine(db_url)
    try:
        await upgrade(engine)
        sm = make_sessionmaker(engine)
        async with engine.begin() as conn:
            mpk = (await conn.execute(insert(Message).values(message_id="<w@x>", user="alice", mail_from="a@x",
                                                             size=1, accepted_at=T0))).inserted_primary_key[0]
        async with sm() as s, s.begin():
            await ev.write_events(s, [Event(EventType.QUEUED, mpk, T0, user="alice")])
        assert len(await _visible(sm, ev.Cursor())) == 1
        url = "https://hooks.example.test/a"
        claimed = await webhooks.claim(sm, url, "w1", 60)
        assert claimed is not None and claimed.attempts == 0 and claimed.delivered == 0
        assert await webhooks.events_after(sm, claimed.cursor, 10) == []  # a new webhook starts from now
        assert await webhooks.claim(sm, url, "w2", 60) is None  # the lease is w1's
        assert await webhooks.claim(sm, url, "w1", 60) is not None  # w1 may renew it
        async with sm() as s, s.begin():
            await ev.write_events(s, [Event(EventType.SENT, mpk, T0 + timedelta(seconds=1), user="alice")])
        (event,) = await _visible(sm, claimed.cursor)
        assert isinstance(event, Event) and event.type == EventType.SENT and event.message_id == "<w@x>"
        failing_since = T0 + timedelta(seconds=2)
        await webhooks.release(sm, claimed, claimed.cursor, 0, 1, failing=True, attempts=3,
                               failing_since=failing_since, next_attempt_at=failing_since + timedelta(seconds=8))
        again = await webhooks.claim(sm, url, "w2", 60)  # released: anyone may take it
        assert again is not None and again.attempts == 3 and again.given_up == 1
        assert again.failing_since == failing_since and again.next_attempt_at == failing_since + timedelta(seconds=8)
        await webhooks.release(sm, again, ev.cursor_of(event), 1, 0)
        async with sm() as s:
            row = await s.get(WebhookCursor, url)
            assert (row.attempts, row.delivered, row.given_up, row.failing_since, row.next_attempt_at,
                    row.lease_owner, row.lease_until) == (0, 1, 1, None, None, None, None)
            assert ev.parse_cursor(row.cursor) == ev.cursor_of(event)
        assert await webhooks.events_after(sm, ev.cursor_of(event), 10) == []
    finally:
        await engine.dispose()
