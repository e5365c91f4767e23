"""Who is tracked and who is logged, through the relay, on both databases: Never Log, GDPR basis,
contacts, logged emails, attachments, the inbound listener, the CRM API and the GDPR erase."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import pytest

from helpers import API_TOKENS, client, free_port
from test_tracker import HTML_MSG, browser, events

LOG_KEY = "alices-secret-log-key-0123"


def crm_config(**extra) -> dict:
    sections = {
        "tracking": {"scanner_window_seconds": 0},
        "never_log": {"team": ["Team-Block@Ext.test"]},
    }
    for k, v in extra.items():
        if isinstance(v, dict):
            sections.setdefault(k, {}).update(v)
        else:
            sections[k] = v
    return sections


async def start(relay, inbound=False, **extra):
    sections = crm_config(**extra)
    if inbound:
        sections.setdefault("relay", {})["inbound_listen"] = f"127.0.0.1:{free_port()}"
    await relay.start(**sections)
    if inbound:
        # users come from the base config; give alice her inbound log address key
        pass


async def call(relay, method, path, user="alice", **kw):
    # From the team's own address (127.0.0.3): a signed-in user's address makes opens from it `self`.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.3", 0))) as s:
        async with s.request(method, f"http://{relay.config.api.listen}/api/v1{path}",
                             headers={"Authorization": f"Bearer {API_TOKENS[user]}"}, **kw) as r:
            body = await r.read()
            import json
            try:
                data = json.loads(body) if body else None
            except ValueError:
                data = body
            return r.status, data


async def send(relay, rcpts, msg=HTML_MSG, user="alice", source="127.0.0.2"):
    c = await client(relay.port, user=user, source=source)
    await c.sendmail(f"{user}@example.com", list(rcpts), msg.replace(b"alice@example.com", f"{user}@example.com".encode()))
    await c.quit()


async def wait_logged(relay, n=1, timeout=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        rows = await relay.rows("SELECT id FROM logged_emails")
        jobs = await relay.rows("SELECT state FROM crm_jobs WHERE state = 'pending'")
        if len(rows) >= n and not jobs:
            return rows
        if loop.time() > deadline:
            return rows
        await asyncio.sleep(0.05)


async def seed_contact(relay, email, owner=None, basis=None, dnt=False):
    from storage import crm
    async with relay.service.sessionmaker() as s:
        async with s.begin():
            c = await crm.ensure_contact(s, email, owner, create=True)
            c.legal_basis, c.do_not_track = basis, dnt


async def test_never_log_recipients_are_delivered_but_get_no_contact_log_or_dates(relay, sink):
    await start(relay)
    assert (await call(relay, "POST", "/never-log", json={"entries": ["*@personal.test"]}))[0] == 201
    await seed_contact(relay, "known@ext.test", owner="bob")
    rcpts = ["team-block@ext.test", "someone@personal.test", "known@ext.test", "new@ext.test"]
    await send(relay, rcpts)
    got = await sink.wait_for(4)
    assert sorted(r.rcpt_tos[0] for r in got) == sorted(rcpts)
    await wait_logged(relay)
    contacts = dict(await relay.rows("SELECT email, owner FROM contacts"))
    assert contacts == {"known@ext.test": "bob", "new@ext.test": "alice"}  # an existing owner is kept
    assert await relay.rows("SELECT marketing FROM contacts WHERE email = 'new@ext.test'") in ([(False,)], [(0,)])
    status, tl = await call(relay, "GET", "/contacts/new@ext.test/timeline")
    assert status == 200 and len(tl["logged_emails"]) == 1 and tl["logged_emails"][0]["direction"] == "outgoing"
    assert (await call(relay, "GET", "/contacts/known@ext.test/timeline"))[1]["logged_emails"][0]["id"] == \
        tl["logged_emails"][0]["id"]
    assert (await call(relay, "GET", "/contacts/someone@personal.test"))[0] == 404
    assert (await call(relay, "GET", "/contacts/team-block@ext.test/timeline"))[0] == 404
    # Their opens still show in the sender's feed, but move no contact dates.
    by_rcpt = {r.rcpt_tos[0]: r.data for r in got}
    import re
    async with browser() as s:
        for rcpt in ("team-block@ext.test", "new@ext.test"):
            url = re.search(rb'src="(http://[^"]+/o/[^"]+\.gif)"', by_rcpt[rcpt]).group(1).decode()
            async with s.get(url) as r:
                assert r.status == 200
    rows = await events(relay, want=2)
    assert {(r[0], r[1], r[2]) for r in rows} == {("opened", "team-block@ext.test", "human"),
                                                  ("opened", "new@ext.test", "human")}
    _, feed = await call(relay, "GET", "/events")
    assert {"team-block@ext.test", "new@ext.test"} <= {e["recipient"] for e in feed["events"] if e["type"] == "opened"}
    _, new = await call(relay, "GET", "/contacts/new@ext.test")
    assert new["last_open_at"] and new["last_engagement_at"] and new["owner"] == "alice" and new["company"] == "ext.test"
    reasons = dict(await relay.rows("SELECT address, reasons FROM recipients"))
    assert "never_log" in str(reasons["team-block@ext.test"]) and "never_log" in str(reasons["someone@personal.test"])


async def test_all_recipients_on_a_list_logs_nothing(relay, sink):
    await start(relay)
    await send(relay, ["team-block@ext.test"])
    await sink.wait_for(1)
    await asyncio.sleep(0.5)
    assert await relay.rows("SELECT id FROM logged_emails") == []
    assert await relay.rows("SELECT id FROM contacts") == []


async def test_team_addresses_ignore_the_lists(relay, sink):
    await start(relay, crm={"team_addresses": ["team-block@ext.test"]})
    await send(relay, ["team-block@ext.test"])
    await sink.wait_for(1)
    assert len(await wait_logged(relay)) == 1


async def test_never_log_limits_and_bad_entries(relay, sink):
    await start(relay)
    entries = [f"user{i}@many.test" for i in range(500)]
    status, body = await call(relay, "POST", "/never-log", json={"entries": entries})
    assert status == 201 and len(body["added"]) == 500
    status, body = await call(relay, "POST", "/never-log", json={"entries": ["one-more@many.test"]})
    assert status == 409 and "at most 500" in body["error"]["message"]
    for bad in ("*@", "a@@b.test", "a b@c.test", "name@", "@x.test", "x*y@z.test"):
        status, body = await call(relay, "POST", "/never-log", json={"entries": [bad]})
        assert status == 400 and body["error"]["message"], bad
    # The team list is for admins; its config entries are read-only.
    status, _ = await call(relay, "POST", "/never-log", json={"scope": "team", "entries": ["x@y.test"]})
    assert status == 403
    status, body = await call(relay, "DELETE", "/never-log", user="bob",
                              json={"scope": "team", "entries": ["team-block@ext.test"]})
    assert status == 409 and "config" in body["error"]["message"]
    status, body = await call(relay, "GET", "/never-log?scope=team")
    assert body["entries"] == [{"entry": "team-block@ext.test", "managed_by": "config"}]
    # IDN domains are normalised.
    status, body = await call(relay, "POST", "/never-log", user="bob", json={"scope": "team",
                                                                             "entries": ["*@Bücher.example"]})
    assert status == 201 and body["added"] == ["*@xn--bcher-kva.example"]


async def test_gdpr_tracks_only_contacts_with_an_accepted_basis(relay, sink):
    await start(relay, privacy={"gdpr": True})
    await seed_contact(relay, "consent@ext.test", basis="consent")
    await seed_contact(relay, "nobasis@ext.test")
    await seed_contact(relay, "legit@ext.test", basis="legitimate_interests")
    rcpts = ["consent@ext.test", "nobasis@ext.test", "legit@ext.test", "stranger@ext.test", "bob@example.com"]
    await send(relay, rcpts)
    got = {r.rcpt_tos[0]: r.data for r in await sink.wait_for(5)}
    original_body = HTML_MSG.split(b"\r\n\r\n", 1)[1]
    assert b"/o/" in got["consent@ext.test"] and b"/c/" in got["consent@ext.test"]
    for rcpt in ("nobasis@ext.test", "legit@ext.test", "stranger@ext.test", "bob@example.com"):
        assert got[rcpt].split(b"\r\n\r\n", 1)[1] == original_body, rcpt
    tokens = dict(await relay.rows("SELECT address, token FROM recipients"))
    assert tokens["consent@ext.test"] and all(tokens[r] is None for r in rcpts[1:])
    await wait_logged(relay)
    # The colleague is neither tracked nor logged; the stranger became a contact (logged, untracked).
    emails = {e for (e,) in await relay.rows("SELECT email FROM contacts")}
    assert "bob@example.com" not in emails and "stranger@ext.test" in emails


async def test_do_not_track_holds_with_gdpr_off(relay, sink):
    await start(relay)
    await seed_contact(relay, "dnt@ext.test", dnt=True)
    await send(relay, ["dnt@ext.test"], HTML_MSG.replace(b"Subject: Offer", b"X-Track: opens, clicks\r\nSubject: Offer"))
    (r,) = await sink.wait_for(1)
    assert r.data.split(b"\r\n\r\n", 1)[1] == HTML_MSG.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("case", ["x_log_no", "bcc", "default_off", "default_off_bcc"])
async def test_logging_switches(relay, sink, case):
    extra = {"crm": {"default_log": False}} if case.startswith("default_off") else {}
    await start(relay, **extra)
    msg = HTML_MSG.replace(b"Subject: Offer", b"X-Log: no\r\nSubject: Offer") if case == "x_log_no" else HTML_MSG
    rcpts = ["carol@ext.test"] + (["log@relay.example.test"] if "bcc" in case else [])
    await send(relay, rcpts, msg)
    (r,) = await sink.wait_for(1)
    assert r.rcpt_tos == ["carol@ext.test"]  # the log address is never delivered
    await asyncio.sleep(0.3)
    logged = await wait_logged(relay, timeout=2 if case in ("x_log_no", "default_off") else 10)
    assert len(logged) == (1 if "bcc" in case else 0)


def with_attachment(size: int, name: str = "quote.pdf") -> tuple[bytes, bytes]:
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    b64 = base64.encodebytes(data).replace(b"\n", b"\r\n")
    msg = (b"From: Alice <alice@example.com>\r\nTo: carol@ext.test\r\nSubject: Quote\r\n"
           b"Message-ID: <quote-1@example.com>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=\"B\"\r\n\r\n--B\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n\r\nThe quote is attached.\r\n--B\r\n"
           b"Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"" + name.encode() +
           b"\"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + b64 + b"--B--\r\n")
    return msg, data


@pytest.mark.parametrize("case", ["logged", "switched_off", "too_large"])
async def test_attachments(relay, sink, case):
    extra = {"switched_off": {"crm": {"log_attachments": False}},
             "too_large": {"crm": {"max_attachment_bytes": 1000}}}.get(case, {})
    await start(relay, **extra)
    msg, data = with_attachment(5000)
    await send(relay, ["carol@ext.test"], msg)
    (r,) = await sink.wait_for(1)
    assert base64.encodebytes(data).replace(b"\n", b"\r\n") in r.data  # delivered whole
    await wait_logged(relay)
    _, tl = await call(relay, "GET", "/contacts/carol@ext.test/timeline")
    (e,) = tl["logged_emails"]
    if case == "logged":
        (att,) = e["attachments"]
        assert att["filename"] == "quote.pdf" and att["size"] == 5000 and e["omitted_attachments"] == []
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{relay.config.api.listen}/api/v1/attachments/{att['id']}",
                             headers={"Authorization": f"Bearer {API_TOKENS['carl']}"}) as resp:
                assert resp.status == 200 and await resp.read() == data
                assert resp.headers["Content-Disposition"].startswith("attachment;")
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
    else:
        assert e["attachments"] == []
        (om,) = e["omitted_attachments"]
        assert om["filename"] == "quote.pdf" and om["size"] == 5000 and om["reason"]
        assert await relay.rows("SELECT id FROM attachments") == []


async def test_attachments_are_stored_once_by_content(relay, sink):
    await start(relay)
    msg, _ = with_attachment(3000)
    await send(relay, ["carol@ext.test"], msg)
    await send(relay, ["dave@ext.test"], msg.replace(b"quote-1@", b"quote-2@"))
    await sink.wait_for(2)
    await wait_logged(relay, 2)
    assert len(await relay.rows("SELECT id FROM attachments")) == 1
    assert len(await relay.rows("SELECT id FROM logged_attachments")) == 2


async def test_x_log_associate_logs_to_the_named_deal(relay, sink):
    await start(relay)
    from storage.models import Deal, DealContact
    await seed_contact(relay, "carol@ext.test", owner="alice")
    async with relay.service.sessionmaker() as s:
        async with s.begin():
            d1, d2 = Deal(kind="deal", name="Big one", is_open=True), Deal(kind="deal", name="Other", is_open=True)
            s.add_all([d1, d2])
            await s.flush()
            (cid,) = (await s.execute(__import__("sqlalchemy").text(
                "SELECT id FROM contacts WHERE email = 'carol@ext.test'"))).one()
            s.add(DealContact(deal_pk=d1.id, contact_pk=cid))
            d2_id, d1_id = d2.id, d1.id
    await send(relay, ["carol@ext.test"])
    await send(relay, ["carol@ext.test"], HTML_MSG.replace(b"Subject: Offer",
                                                           f"X-Log-Associate: deal:{d2_id}\r\nSubject: Offer".encode()))
    await sink.wait_for(2)
    await wait_logged(relay, 2)
    rows = await relay.rows("SELECT logged_pk, target_pk FROM logged_associations WHERE kind = 'deal' ORDER BY logged_pk")
    assert [t for _, t in rows] == [d1_id, d2_id]


async def inbound_send(relay, raw: bytes, rcpt=f"log+{LOG_KEY}@relay.example.test"):
    import aiosmtplib
    host, port = relay.config.relay.inbound_listen.split(":")
    c = aiosmtplib.SMTP(hostname=host, port=int(port), start_tls=False, local_hostname="mx.ext.test", timeout=10)
    await c.connect()
    try:
        return await c.sendmail("carol@ext.test", [rcpt], raw)
    finally:
        c.close()


def alice_with_log_key(relay_fixture) -> dict:
    users = relay_fixture.config_dict()["users"]
    users[0]["log_key"] = LOG_KEY
    return users


async def test_inbound_reply_records_replied_inferred_open_and_threads(relay, sink):
    await start(relay, inbound=True, users=alice_with_log_key(relay))
    await send(relay, ["carol@ext.test"], HTML_MSG.replace(b"Subject: Offer", b"Message-ID: <offer-1@example.com>\r\nSubject: Offer"))
    await sink.wait_for(1)
    await wait_logged(relay)
    reply = (b"From: Carol <carol@ext.test>\r\nTo: alice@example.com\r\nSubject: Re: Offer\r\n"
             b"Message-ID: <reply-1@ext.test>\r\nIn-Reply-To: <offer-1@example.com>\r\n"
             b"References: <offer-1@example.com>\r\n\r\nSounds good!\r\n")
    await inbound_send(relay, reply)
    rows = await relay.rows("SELECT e.type, e.inferred, e.reason FROM events e WHERE e.type IN ('opened', 'replied') ORDER BY e.id")
    assert [(t, bool(i)) for t, i, _ in rows] == [("opened", True), ("replied", False)]
    _, tl = await call(relay, "GET", "/contacts/carol@ext.test/timeline")
    assert [e["direction"] for e in tl["logged_emails"]] == ["incoming", "outgoing"]
    assert len({e["thread"] for e in tl["logged_emails"]}) == 1
    _, th = await call(relay, "GET", f"/logged-emails/{tl['logged_emails'][0]['id']}/thread")
    assert [e["subject"] for e in th["logged_emails"]] == ["Offer", "Re: Offer"]
    _, contact = await call(relay, "GET", "/contacts/carol@ext.test")
    assert contact["last_engagement_at"]


async def test_inbound_second_reply_is_not_the_first_and_infers_no_second_open(relay, sink):
    await start(relay, inbound=True, users=alice_with_log_key(relay))
    await send(relay, ["carol@ext.test"], HTML_MSG.replace(b"Subject: Offer", b"Message-ID: <offer-9@example.com>\r\nSubject: Offer"))
    await sink.wait_for(1)
    await wait_logged(relay)
    for n in (1, 2):
        await inbound_send(relay, (b"From: carol@ext.test\r\nTo: alice@example.com\r\nSubject: Re: Offer\r\n"
                                   b"Message-ID: <reply-9-%d@ext.test>\r\nIn-Reply-To: <offer-9@example.com>\r\n\r\n"
                                   b"Yes.\r\n" % n))
    rows = await relay.rows("SELECT type, first, inferred FROM events WHERE type IN ('opened', 'replied') ORDER BY id")
    assert [(t, bool(f), bool(i)) for t, f, i in rows] == [
        ("opened", True, True), ("replied", True, False), ("replied", False, False)]


async def test_inbound_out_of_office_is_logged_and_a_machine_reply_not_a_human_one(relay, sink):
    await start(relay, inbound=True, users=alice_with_log_key(relay))
    await send(relay, ["carol@ext.test"], HTML_MSG.replace(b"Subject: Offer", b"Message-ID: <offer-2@example.com>\r\nSubject: Offer"))
    await sink.wait_for(1)
    ooo = (b"From: carol@ext.test\r\nTo: alice@example.com\r\nSubject: Automatic reply: Offer\r\n"
           b"Auto-Submitted: auto-replied\r\nIn-Reply-To: <offer-2@example.com>\r\n\r\nI am away.\r\n")
    await inbound_send(relay, ooo)
    # not a reply: no human replied, no inferred open; what was recognised is stored with a
    # machine replied (issue 21)
    assert await relay.rows("SELECT id FROM events WHERE type IN ('replied', 'opened') "
                            "AND classification = 'human'") == []
    rows = await relay.rows("SELECT type, classification, reason FROM events WHERE type IN ('replied', 'opened')")
    assert [(t, c) for t, c, _ in rows] == [("replied", "machine")]
    assert rows[0][2].startswith("auto_reply:") and "Auto-Submitted" in rows[0][2]


async def test_inbound_dsn_records_bounced(relay, sink):
    await start(relay, inbound=True, users=alice_with_log_key(relay))
    await send(relay, ["carol@ext.test", "dave@ext.test"],
               HTML_MSG.replace(b"Subject: Offer", b"Message-ID: <offer-3@example.com>\r\nSubject: Offer"))
    await sink.wait_for(2)
    from relay.dsn import Failed, build
    from datetime import datetime, timezone
    dsn = build(hostname="smarthost.test", dsn_from="", to="alice@example.com",
                original=b"Message-ID: <offer-3@example.com>\r\nSubject: Offer\r\n\r\n",
                message_id="<offer-3@example.com>", arrival=datetime.now(timezone.utc),
                failed=[Failed("dave@ext.test", "550 5.1.1 No such user")])
    await inbound_send(relay, dsn)
    rows = await relay.rows("SELECT r.address, e.type FROM events e JOIN recipients r ON r.id = e.recipient_pk "
                            "WHERE e.type = 'bounced'")
    assert rows == [("dave@ext.test", "bounced")]


async def test_inbound_refuses_other_recipients(relay, sink):
    import aiosmtplib
    await start(relay, inbound=True, users=alice_with_log_key(relay))
    for rcpt in ("log+wrong-key@relay.example.test", "carol@ext.test", f"log+{LOG_KEY}@other.test"):
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as e:
            await inbound_send(relay, b"Subject: x\r\n\r\nx\r\n", rcpt=rcpt)
        assert e.value.recipients[0].code == 550 and "5.7.1" in e.value.recipients[0].message
    await asyncio.sleep(0.2)
    assert sink.received == []


async def test_pin_unpin_delete_with_permissions(relay, sink):
    await start(relay)
    await send(relay, ["carol@ext.test"])
    await send(relay, ["carol@ext.test"], HTML_MSG.replace(b"Subject: Offer", b"Subject: Second"))
    await sink.wait_for(2)
    await wait_logged(relay, 2)
    _, tl = await call(relay, "GET", "/contacts/carol@ext.test/timeline", user="carl")
    older, newer = tl["logged_emails"][1], tl["logged_emails"][0]
    assert (await call(relay, "POST", f"/logged-emails/{older['id']}/pin", user="carl"))[0] == 200
    _, tl = await call(relay, "GET", "/contacts/carol@ext.test/timeline")
    assert tl["logged_emails"][0]["id"] == older["id"] and tl["logged_emails"][0]["pinned"]
    assert (await call(relay, "POST", f"/logged-emails/{older['id']}/unpin"))[0] == 200
    status, body = await call(relay, "DELETE", f"/logged-emails/{newer['id']}", user="carl")
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert (await call(relay, "DELETE", f"/logged-emails/{newer['id']}"))[0] == 204
    _, detail = await call(relay, "GET", f"/logged-emails/{older['id']}")
    assert "the offer" in detail["html"] and "/o/" not in detail["html"] and "/c/" not in detail["html"]
    _, tl = await call(relay, "GET", "/contacts/carol@ext.test/timeline")
    assert [e["id"] for e in tl["logged_emails"]] == [older["id"]]


async def test_contact_changes_by_owner_and_admin_only(relay, sink):
    await start(relay)
    await seed_contact(relay, "carol@ext.test", owner="alice")
    assert (await call(relay, "PUT", "/contacts/carol@ext.test", user="carl", json={"legal_basis": "consent"}))[0] == 403
    status, c = await call(relay, "PUT", "/contacts/carol@ext.test", json={"legal_basis": "consent", "marketing": True})
    assert status == 200 and c["legal_basis"] == "consent" and c["marketing"] is True
    status, c = await call(relay, "PUT", "/contacts/carol@ext.test", user="bob", json={"do_not_track": True})
    assert status == 200 and c["do_not_track"] is True
    status, body = await call(relay, "PUT", "/contacts/carol@ext.test", json={"legal_basis": "vibes"})
    assert status == 400 and "legal_basis" in body["error"]["message"]
    assert (await call(relay, "DELETE", "/contacts/carol@ext.test"))[0] == 403  # erase is for admins


async def test_gdpr_erase_leaves_nothing_of_the_person(relay, sink):
    await start(relay)
    msg, _ = with_attachment(2000, "only-carol.pdf")
    await send(relay, ["carol@ext.test"], msg)
    await send(relay, ["carol@ext.test", "dave@ext.test"])
    got = await sink.wait_for(3)
    await wait_logged(relay, 2)
    import re
    async with browser() as s:
        for r in got:
            m = re.search(rb'src="(http://[^"]+/o/[^"]+\.gif)"', r.data)
            if m and r.rcpt_tos == ["carol@ext.test"]:
                async with s.get(m.group(1).decode()) as resp:
                    assert resp.status == 200
    await events(relay, want=1)
    assert (await call(relay, "DELETE", "/contacts/carol@ext.test", user="bob"))[0] == 204
    assert await relay.rows("SELECT id FROM contacts WHERE email = 'carol@ext.test'") == []
    assert await relay.rows("SELECT id FROM recipients WHERE lower(address) = 'carol@ext.test'") == []
    assert await relay.rows("SELECT e.id FROM events e JOIN recipients r ON r.id = e.recipient_pk "
                            "WHERE r.address = 'erased@invalid'") == []
    assert await relay.rows("SELECT id FROM recipients WHERE token IS NOT NULL AND address = 'erased@invalid'") == []
    # Her sole-contact logged email and its attachment are gone; the one shared with dave stays.
    subjects = [s for (s,) in await relay.rows("SELECT subject FROM logged_emails")]
    assert subjects == ["Offer"]
    assert await relay.rows("SELECT id FROM attachments") == []
    _, tl = await call(relay, "GET", "/contacts/dave@ext.test/timeline")
    assert "carol@ext.test" in tl["logged_emails"][0]["to"] or tl["logged_emails"][0]["to"]


async def test_cli_never_log_and_contacts(relay, sink, tmp_path):
    from helpers import to_toml
    from trackrelay.cli import main
    await start(relay)
    await seed_contact(relay, "carol@ext.test", owner="alice")
    cfg = tmp_path / "t.toml"
    cfg.write_text(to_toml(relay.config_dict(**crm_config())))

    def run(*args):
        return main(["-c", str(cfg), *args])

    assert await asyncio.to_thread(run, "never-log", "add", "--user", "alice", "*@Blocked.test", "x@y.test") == 0
    assert await asyncio.to_thread(run, "never-log", "add", "bad entry") == 1
    assert await asyncio.to_thread(run, "never-log", "remove", "team-block@ext.test") == 1  # config-managed
    assert await asyncio.to_thread(run, "never-log", "remove", "--user", "alice", "x@y.test") == 0
    assert await relay.rows("SELECT entry FROM never_log WHERE scope = 'user' AND \"user\" = 'alice'") == [("*@blocked.test",)]
    assert await asyncio.to_thread(run, "contacts", "set-basis", "carol@ext.test", "contract") == 0
    assert await relay.rows("SELECT legal_basis FROM contacts") == [("contract",)]
    assert await asyncio.to_thread(run, "contacts", "set-basis", "carol@ext.test", "vibes") == 2
    assert await asyncio.to_thread(run, "contacts", "show", "carol@ext.test") == 0
    assert await asyncio.to_thread(run, "contacts", "forget", "carol@ext.test") == 0
    assert await relay.rows("SELECT id FROM contacts") == []


async def test_company_by_registrable_domain_and_none_for_free_mail(relay, sink):
    await start(relay)
    await send(relay, ["john@eu.acme.co.uk", "jane@acme.co.uk", "x@hotmail.co.uk", "y@T-Online.de"], HTML_MSG)
    c = await client(relay.port, user="alice", source="127.0.0.2")
    await c.sendmail("alice@example.com", ["z@bücher.de"], HTML_MSG, mail_options=["SMTPUTF8"])
    await c.quit()
    await sink.wait_for(5)
    await wait_logged(relay, 2)
    rows = dict(await relay.rows("SELECT c.email, co.domain FROM contacts c LEFT JOIN companies co ON co.id = c.company_pk"))
    assert rows["john@eu.acme.co.uk"] == rows["jane@acme.co.uk"] == "acme.co.uk"
    assert rows["x@hotmail.co.uk"] is None and rows["y@t-online.de"] is None
    assert rows["z@bücher.de"] == "xn--bcher-kva.de"  # IDNA 2008, one form for comparing
    assert len(await relay.rows("SELECT id FROM companies")) == 2


async def test_inbound_bounce_from_mailer_daemon_is_neither_logged_nor_a_contact(relay, sink):
    await start(relay, inbound=True, users=alice_with_log_key(relay))
    await send(relay, ["dave@ext.test"], HTML_MSG.replace(b"Subject: Offer", b"Message-ID: offer-4@example.com\r\nSubject: Offer"))
    await sink.wait_for(1)
    await wait_logged(relay)
    qmail = (b"From: MAILER-DAEMON@mx.ext.test\r\nTo: alice@example.com\r\nSubject: failure notice\r\n\r\n"
             b"Hi. This is the qmail-send program at mx.ext.test.\r\n"
             b"I'm afraid I wasn't able to deliver your message to the following addresses.\r\n"
             b"This is a permanent error; I've given up. Sorry it didn't work out.\r\n\r\n"
             b"<dave@ext.test>:\r\nSorry, no mailbox here by that name. (#5.1.1)\r\n\r\n"
             b"--- Below this line is a copy of the message.\r\n\r\n"
             b"From: alice@example.com\r\nTo: dave@ext.test\r\nMessage-ID: offer-4@example.com\r\nSubject: Offer\r\n\r\nHi\r\n")
    await inbound_send(relay, qmail)
    rows = await relay.rows("SELECT r.address, e.type, e.reason FROM events e JOIN recipients r ON r.id = e.recipient_pk "
                            "WHERE e.type = 'bounced'")
    assert [(a, t) for a, t, _ in rows] == [("dave@ext.test", "bounced")] and "qmail; status 5.1.1" in rows[0][2]
    assert await relay.rows("SELECT id FROM logged_emails WHERE direction = 'incoming'") == []
    assert await relay.rows("SELECT email FROM contacts WHERE email LIKE 'mailer-daemon%'") == []


async def test_never_log_entries_for_idn_domains_are_idna_2008(relay, sink):
    # IDNA 2003 made faß.de into fass.de: another domain, whose mail would then go unlogged.
    await start(relay)
    status, body = await call(relay, "POST", "/never-log", json={"entries": ["*@faß.de"]})
    assert status == 201 and body["added"] == ["*@xn--fa-hia.de"]
    for bad in ("*@💩.la", "*@xn--ls8h.la"):  # emoji are not IDNA 2008
        status, body = await call(relay, "POST", "/never-log", json={"entries": [bad]})
        assert status == 400 and "not a valid domain" in body["error"]["message"], bad
    await send(relay, ["x@xn--fa-hia.de", "x@fass.de"])
    await sink.wait_for(2)
    reasons = dict(await relay.rows("SELECT address, reasons FROM recipients"))
    assert "never_log" in str(reasons["x@xn--fa-hia.de"]) and "never_log" not in str(reasons["x@fass.de"])
