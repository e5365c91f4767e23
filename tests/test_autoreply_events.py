"""Issue 21: what an automatic reply was recognised as, and why, is stored with an event.

Through the real inbound listener over SMTP, after a real message to that recipient: an automatic
reply with the proof of a reply (In-Reply-To names our message, its sender was the recipient)
records a ``replied`` classified ``machine`` with reason ``auto_reply:<what relay.autoreply
recognised>``, no inferred open and no engagement date; the feed's status stays ``sent``. A
person's reply that merely mentions being out of office stays a human reply."""

from __future__ import annotations

import asyncio

from test_crm import HTML_MSG, alice_with_log_key, call, inbound_send, send, start, wait_logged

MACHINE_REPLY_CASES = {
    "header": (b"Subject: Re: Offer\r\nAuto-Submitted: auto-replied\r\n",
               "auto_reply:header Auto-Submitted: auto-replied"),
    "subject": (b"Subject: Out of Office: Offer\r\n", "auto_reply:subject: out of office"),
}


async def _sent_offer(relay, sink, tag: str) -> int:
    await start(relay, inbound=True, users=alice_with_log_key(relay))
    await send(relay, ["carol@ext.test"],
               HTML_MSG.replace(b"Subject: Offer", f"Message-ID: <offer-{tag}@example.com>\r\nSubject: Offer".encode()))
    await sink.wait_for(1)
    await relay.wait_status({"sent"}, 1)
    await wait_logged(relay)
    (pk,), = await relay.rows("SELECT id FROM messages WHERE message_id LIKE :m", m=f"%offer-{tag}@example.com%")
    return pk


def _reply(tag: str, head: bytes, body: bytes) -> bytes:
    return (b"From: Carol <carol@ext.test>\r\nTo: alice@example.com\r\n" + head +
            f"Message-ID: <reply-{tag}@ext.test>\r\nIn-Reply-To: <offer-{tag}@example.com>\r\n"
            f"References: <offer-{tag}@example.com>\r\n\r\n".encode() + body)


async def _visible(relay, path: str) -> dict:
    """The API's answer once the replied event shows in it: the event log shows what every older
    transaction has committed (PostgreSQL's commit order), so it may lag a moment."""
    for _ in range(200):
        _, body = await call(relay, "GET", path)
        if any(e["type"] == "replied" for e in body["events"]):
            return body
        await asyncio.sleep(0.05)
    return body


async def _engagement(relay):
    return await relay.rows("SELECT type, classification, reason, inferred, " + '"first"' +
                            " FROM events WHERE type IN ('opened', 'clicked', 'replied') ORDER BY id")


async def _check_machine_reply(relay, sink, case: str) -> None:
    head, reason = MACHINE_REPLY_CASES[case]
    pk = await _sent_offer(relay, sink, case)
    await inbound_send(relay, _reply(case, head, b"I am away until Monday.\r\n"))
    rows = await _engagement(relay)
    assert [(t, c, r, bool(i), bool(f)) for t, c, r, i, f in rows] == [("replied", "machine", reason, False, False)]
    item = await _visible(relay, f"/messages/{pk}")
    (rcpt,) = item["recipients"]
    assert rcpt["address"] == "carol@ext.test" and rcpt["status"] == "sent"
    replied = [e for e in item["events"] if e["type"] == "replied"]
    assert [(e["classification"], e["reason"], e["inferred"], e["recipient"]) for e in replied] == \
        [("machine", reason, False, "carol@ext.test")]
    listed = await _visible(relay, "/events")
    assert [(e["classification"], e["reason"]) for e in listed["events"] if e["type"] == "replied"] == \
        [("machine", reason)]
    _, contact = await call(relay, "GET", "/contacts/carol@ext.test")
    assert not contact["last_engagement_at"]
    # the same auto-reply delivered again records nothing twice
    await inbound_send(relay, _reply(case, head, b"I am away until Monday.\r\n"))
    assert len(await _engagement(relay)) == 1


async def test_out_of_office_by_header_is_a_machine_reply_with_its_reason(relay, sink):
    await _check_machine_reply(relay, sink, "header")


async def test_out_of_office_by_subject_is_a_machine_reply_with_its_reason(relay, sink):
    await _check_machine_reply(relay, sink, "subject")


async def test_human_reply_quoting_out_of_office_stays_a_human_reply(relay, sink):
    pk = await _sent_offer(relay, sink, "human")
    await inbound_send(relay, _reply("human", b"Subject: Re: Offer\r\n",
                                     b"Sorry, I was out of office last week. Sounds good!\r\n\r\n"
                                     b"> Out of office: back on Monday\r\n"))
    rows = await _engagement(relay)
    assert [(t, c, r, bool(i), bool(f)) for t, c, r, i, f in rows] == [
        ("opened", "human", "inferred_from_reply", True, True), ("replied", "human", None, False, True)]
    _, item = await call(relay, "GET", f"/messages/{pk}")
    assert item["recipients"][0]["status"] == "replied"
    _, contact = await call(relay, "GET", "/contacts/carol@ext.test")
    assert contact["last_engagement_at"]


async def test_machine_reply_then_human_reply_infers_the_open_and_is_first(relay, sink):
    """A machine reply is no engagement: the person's later reply is still their first, with the
    inferred open before it."""
    await _sent_offer(relay, sink, "both")
    await inbound_send(relay, _reply("both", b"Subject: Automatic reply: Offer\r\nX-Autoreply: yes\r\n", b"Away.\r\n"))
    await inbound_send(relay, _reply("both", b"Subject: Re: Offer\r\n", b"Back now: yes, please.\r\n")
                       .replace(b"<reply-both@ext.test>", b"<reply-both-2@ext.test>"))
    rows = await _engagement(relay)
    assert [(t, c, bool(i), bool(f)) for t, c, _, i, f in rows] == [
        ("replied", "machine", False, False), ("opened", "human", True, True), ("replied", "human", False, True)]
    assert rows[0][2] == "auto_reply:header x-autoreply"
