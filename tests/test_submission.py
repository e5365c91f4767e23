"""SMTP submission over loopback to the real relay: AUTH, sender binding, limits, relay tricks,
smuggling, header changes and the per-recipient split."""

from __future__ import annotations

import asyncio
import re
import smtplib

import aiosmtplib
import pytest

from helpers import PASSWORD, client, simple_message


async def raw_session(port: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()

    async def cmd(line: bytes) -> bytes:
        writer.write(line + b"\r\n")
        await writer.drain()
        out = b""
        while True:
            got = await asyncio.wait_for(reader.readline(), 10)
            out += got
            if not got or got[3:4] != b"-":
                return out

    return reader, writer, cmd


async def authed_raw(port: int):
    import base64
    reader, writer, cmd = await raw_session(port)
    await cmd(b"EHLO client.test")
    token = base64.b64encode(b"\0alice\0" + PASSWORD.encode())
    assert (await cmd(b"AUTH PLAIN " + token)).startswith(b"235")
    return reader, writer, cmd


async def test_three_recipients_arrive_as_three_single_recipient_transactions(relay, sink):
    await relay.start()
    c = await client(relay.port)
    msg = simple_message(extra="X-Track: none\r\nMessage-ID: <m1@example.com>\r\n")
    rcpts = ["carol@ext.test", "dave@ext.test", "erin@other.test"]
    errors, reply = await c.sendmail("alice@example.com", rcpts, msg)
    await c.quit()
    assert errors == {} and reply.startswith("2.0.0 OK: queued")
    got = await sink.wait_for(3)
    assert sorted(r.rcpt_tos[0] for r in got) == sorted(rcpts)
    assert all(len(r.rcpt_tos) == 1 for r in got)
    for r in got:
        assert r.mail_from == "alice@example.com"
        # Documented changes only: a Received header on top, the control header removed.
        assert r.data.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby relay.example.test")
        body_from = r.data.index(b"From: Alice")
        assert r.data[body_from:] == msg.replace(b"X-Track: none\r\n", b"")


async def test_a_recipient_given_twice_gets_one_copy_and_a_new_transaction_starts_afresh(relay, sink):
    await relay.start()
    reader, writer, cmd = await authed_raw(relay.port)
    assert (await cmd(b"MAIL FROM:<alice@example.com>")).startswith(b"250")
    for rcpt, reply in ((b"carol@ext.test", b"Recipient OK"), (b"Carol@EXT.test", b"already given"),
                        (b"dave@ext.test", b"Recipient OK"), (b"carol@ext.test", b"already given")):
        assert reply in await cmd(b"RCPT TO:<" + rcpt + b">")
    assert (await cmd(b"RSET")).startswith(b"250")  # a new envelope: nobody given yet
    assert (await cmd(b"MAIL FROM:<alice@example.com>")).startswith(b"250")
    assert b"Recipient OK" in await cmd(b"RCPT TO:<Carol@ext.test>")
    assert b"already given" in await cmd(b"RCPT TO:<carol@ext.test>")
    assert (await cmd(b"DATA")).startswith(b"354")
    writer.write(simple_message() + b".\r\n")
    assert (await cmd(b"QUIT")).startswith(b"250 2.0.0 OK: queued")
    writer.close()
    await writer.wait_closed()
    got = await sink.wait_for(1)
    assert [r.rcpt_tos for r in got] == [["Carol@ext.test"]]


async def test_message_id_added_when_missing_and_control_headers_removed(relay, sink):
    await relay.start()
    c = await client(relay.port)
    msg = simple_message(extra="x-track: opens\r\nX-LOG: no\r\nX-Log-Associate: deal:1\r\n")
    await c.sendmail("alice@example.com", ["carol@ext.test"], msg)
    await c.quit()
    (r,) = await sink.wait_for(1)
    head = r.data.split(b"\r\n\r\n")[0].lower()
    # (our own x-trackrelay-ref is another header)
    assert not re.search(rb"^(?:x-track|x-log|x-log-associate):", head, re.M)
    assert b"message-id: <" in head and b"@relay.example.test>" in head
    assert r.data.endswith(b"\r\n\r\nHi there.\r\n")


async def test_bare_lf_and_cr_are_normalised_to_crlf(relay, sink):
    await relay.start()
    c = await client(relay.port)
    msg = b"From: alice@example.com\nTo: carol@ext.test\nSubject: lf\n\nline one\nline two\rline three\r\n"
    await c.sendmail("alice@example.com", ["carol@ext.test"], msg)
    await c.quit()
    (r,) = await sink.wait_for(1)
    assert r.data.endswith(b"\r\n\r\nline one\r\nline two\r\nline three\r\n")
    assert b"\n" not in r.data.replace(b"\r\n", b"")


async def test_unauthenticated_mail_and_rcpt_get_530(relay):
    await relay.start()
    _, w, cmd = await raw_session(relay.port)
    await cmd(b"EHLO x.test")
    assert (await cmd(b"MAIL FROM:<alice@example.com>")).startswith(b"530 5.7.0")
    assert (await cmd(b"RCPT TO:<carol@ext.test>")).startswith(b"530 5.7.0")
    assert (await cmd(b"NOOP")).startswith(b"250")  # the session goes on
    w.close()


@pytest.mark.parametrize("rcpt", [
    "carol%ext.test@relay.example.test",
    "ext.test!carol@relay.example.test",
    "@relay.example.test:carol@ext.test",
    '"carol@ext.test"@relay.example.test',
    "carol@ext.test@relay.example.test",
    "carol@ext.test",
])
async def test_unauthenticated_relay_tricks_get_5xx_at_rcpt(relay, sink, rcpt):
    await relay.start()
    _, w, cmd = await raw_session(relay.port)
    await cmd(b"EHLO x.test")
    await cmd(b"MAIL FROM:<someone@ext.test>")
    reply = await cmd(f"RCPT TO:<{rcpt}>".encode())
    assert reply[:1] == b"5", reply
    assert (await cmd(b"DATA"))[:1] == b"5"
    w.close()
    await asyncio.sleep(0.2)
    assert sink.received == []


@pytest.mark.parametrize("rcpt", [
    "carol%ext.test@relay.example.test",
    "ext.test!carol@relay.example.test",
    "@relay.example.test:carol@ext.test",
    '"carol@ext.test"@relay.example.test',
])
async def test_authenticated_relay_tricks_are_refused_too(relay, rcpt):
    await relay.start()
    _, w, cmd = await authed_raw(relay.port)
    assert (await cmd(b"MAIL FROM:<alice@example.com>")).startswith(b"250")
    reply = await cmd(f"RCPT TO:<{rcpt}>".encode())
    assert reply[:1] == b"5", reply
    assert (await cmd(b"RCPT TO:<carol@ext.test>")).startswith(b"250 2.1.5")  # session goes on
    w.close()


async def test_wrong_password_gets_535_and_lockout_after_max_failures(relay):
    await relay.start(relay={"auth_max_failures": 3})
    for _ in range(2):
        c = await client(relay.port, user=None)
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as e:
            await c.auth_plain("alice", "wrong")
        assert e.value.code == 535
        c.close()
    c = await client(relay.port, user=None)
    with pytest.raises(aiosmtplib.SMTPException) as e:
        await c.auth_plain("alice", "wrong")
    assert "4.7.0" in str(e.value)
    c.close()
    # Locked out: the right password does not help now, for this user name from this address ...
    c = await client(relay.port, user=None)
    with pytest.raises(aiosmtplib.SMTPException):
        await c.auth_plain("alice", PASSWORD)
    c.close()
    # ... but another user from the same address (the same office NAT) is not locked out.
    c = await client(relay.port, user="bob")
    await c.quit()


async def test_mail_from_not_owned_gets_553_and_session_goes_on(relay, sink):
    await relay.start()
    c = await client(relay.port)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as e:
        await c.sendmail("bob@example.com", ["carol@ext.test"], simple_message(frm="bob@example.com"))
    assert e.value.code == 553 and "5.7.1" in e.value.message
    await c.rset()
    await c.sendmail("alice@example.com", ["carol@ext.test"], simple_message())
    await c.quit()
    assert len(await sink.wait_for(1)) == 1


@pytest.mark.parametrize("header", ["From: Bob <bob@example.com>", "Sender: mallory@ext.test"])
async def test_from_or_sender_header_of_someone_else_gets_550(relay, sink, header):
    await relay.start()
    c = await client(relay.port)
    msg = simple_message() if header.startswith("Sender") else simple_message(frm="bob@example.com")
    if header.startswith("Sender"):
        msg = (header + "\r\n").encode() + msg
    with pytest.raises(aiosmtplib.SMTPDataError) as e:
        await c.sendmail("alice@example.com", ["carol@ext.test"], msg)
    assert e.value.code == 550 and "5.7.1" in e.value.message
    assert (await c.noop()).code == 250
    await c.quit()
    await asyncio.sleep(0.3)
    assert sink.received == []


async def test_oversize_message_gets_552_534(relay, sink):
    await relay.start(relay={"max_message_bytes": 4096})
    c = await client(relay.port)
    big = simple_message(body="x" * 70 + "\r\n") * 1 + (("y" * 70 + "\r\n") * 100).encode()
    with pytest.raises(aiosmtplib.SMTPResponseException) as e:
        await c.sendmail("alice@example.com", ["carol@ext.test"], big)
    assert e.value.code == 552 and "5.3.4" in e.value.message
    # MAIL FROM with a SIZE above the limit is refused up front, with the same code.
    _, w, cmd = await authed_raw(relay.port)
    reply = await cmd(b"MAIL FROM:<alice@example.com> SIZE=999999")
    assert reply.startswith(b"552 5.3.4"), reply
    w.close()
    await c.quit()


async def test_size_limit_never_above_what_the_upstream_advertises(relay, sink):
    sink.behaviour.size = 3000
    await relay.start()
    await asyncio.sleep(0.3)  # the start-up SIZE probe
    c = await client(relay.port)
    ehlo = await c.ehlo()
    advertised = int(ehlo.message.split("SIZE ")[1].split()[0])
    assert advertised <= 3000 - 1024  # room for the headers the relay adds
    with pytest.raises(aiosmtplib.SMTPResponseException) as e:
        await c.sendmail("alice@example.com", ["carol@ext.test"], simple_message(body="z" * 5000))
    assert e.value.code == 552 and "5.3.4" in e.value.message
    c.close()


async def test_too_many_recipients_get_452_453(relay, sink):
    await relay.start(relay={"max_recipients": 2})
    _, w, cmd = await authed_raw(relay.port)
    await cmd(b"MAIL FROM:<alice@example.com>")
    assert (await cmd(b"RCPT TO:<a@ext.test>")).startswith(b"250")
    assert (await cmd(b"RCPT TO:<b@ext.test>")).startswith(b"250")
    assert (await cmd(b"RCPT TO:<c@ext.test>")).startswith(b"452 4.5.3")
    assert (await cmd(b"DATA")).startswith(b"354")
    assert (await cmd(simple_message().rstrip(b"\r\n") + b"\r\n.")).startswith(b"250 2.0.0")
    w.close()
    got = await sink.wait_for(2)
    assert sorted(r.rcpt_tos[0] for r in got) == ["a@ext.test", "b@ext.test"]


@pytest.mark.parametrize("addr", [b"<caro\rl@ext.test>", b"<carol\x00@ext.test>", b"<carol@ext\r.test>"])
async def test_envelope_addresses_with_cr_lf_or_nul_are_refused(relay, addr):
    await relay.start()
    _, w, cmd = await authed_raw(relay.port)
    assert (await cmd(b"MAIL FROM:" + addr.replace(b"carol", b"alice").replace(b"ext.test", b"example.com")))[:1] == b"5"
    await cmd(b"RSET")
    assert (await cmd(b"MAIL FROM:<alice@example.com>")).startswith(b"250")
    reply = await cmd(b"RCPT TO:" + addr)
    assert reply[:1] == b"5", reply
    assert (await cmd(b"NOOP")).startswith(b"250")
    w.close()


async def test_over_long_command_line_gets_500_and_session_goes_on(relay):
    await relay.start()
    _, w, cmd = await authed_raw(relay.port)
    reply = await cmd(b"MAIL FROM:<" + b"a" * 3000 + b"@example.com>")
    assert reply.startswith(b"500 5.5.2"), reply
    assert (await cmd(b"NOOP")).startswith(b"250")
    w.close()


async def test_over_long_data_line_gets_500_and_session_goes_on(relay, sink):
    await relay.start()
    _, w, cmd = await authed_raw(relay.port)
    # relay.max_line_octets (64 KiB by default, far above RFC 5322's 998: real clients pass it)
    for line, expect in ((b"a" * 65537, b"500 5.5.2"), (b"a" * 999, b"250 2.0.0")):
        await cmd(b"MAIL FROM:<alice@example.com>")
        await cmd(b"RCPT TO:<carol@ext.test>")
        assert (await cmd(b"DATA")).startswith(b"354")
        reply = await cmd(b"From: alice@example.com\r\nSubject: long\r\n\r\n" + line + b"\r\n.")
        assert reply.startswith(expect), (len(line), reply)  # 65,537 octets + CRLF is over the limit
    assert (await cmd(b"NOOP")).startswith(b"250")
    w.close()
    (r,) = await sink.wait_for(1)
    assert b"a" * 999 + b"\r\n" in r.data


async def test_data_dot_unstuffing_empty_body_and_a_command_pipelined_after_the_dot(relay, sink):
    await relay.start()
    r_, w, cmd = await authed_raw(relay.port)
    await cmd(b"MAIL FROM:<alice@example.com>")
    await cmd(b"RCPT TO:<carol@ext.test>")
    assert (await cmd(b"DATA")).startswith(b"354")
    body = b"From: alice@example.com\r\nSubject: dots\r\n\r\n..leading dot\r\n..\r\n.x\r\nend"
    # the final dot and the next command arrive in one packet: the command is answered after the 250
    reply = await cmd(body + b"\r\n.\r\nNOOP")
    assert reply.startswith(b"250 2.0.0"), reply
    assert (await asyncio.wait_for(r_.readline(), 10)).startswith(b"250")  # the NOOP's answer
    assert (await cmd(b"MAIL FROM:<alice@example.com>")).startswith(b"250")
    assert (await cmd(b"RCPT TO:<dave@ext.test>")).startswith(b"250")
    assert (await cmd(b"DATA")).startswith(b"354")
    # An empty message (the first line is the dot) ends DATA; it has no From:, so it is refused.
    assert (await cmd(b".")).startswith(b"550 5.7.1 No From:")
    assert (await cmd(b"NOOP")).startswith(b"250")
    w.close()
    (got,) = await sink.wait_for(1)
    assert got.data.endswith(b"\r\n\r\n.leading dot\r\n.\r\nx\r\nend\r\n")


def test_fast_envelope_address_parse_agrees_with_aiosmtpd():
    from aiosmtpd.smtp import SMTP

    from relay.protocol import RelaySMTP
    loop = asyncio.new_event_loop()  # aiosmtpd would make one per instance and leave it open
    ours, theirs = RelaySMTP(object(), hostname="x", loop=loop), SMTP(object(), hostname="x", loop=loop)
    loop.close()
    for arg in ("<alice@example.com>", " <alice@example.com> SIZE=100 BODY=8BITMIME", "<a.b+c@ex-ample.co.uk>",
                "<>", "alice@example.com", "<a..b@x.com>", '<"q u"@x.com>', "<@route:a@b.com>", "<a@[127.0.0.1]>",
                "<" + "l" * 70 + "@x.com>", "<a@b>x", "<ü@x.com>", "<a@b.com> (comment) SIZE=1", "<a@b.com>\tSIZE=1",
                "<a@b.com>   ", "<a@b.com> <c@d.com>", "<a@b.com>SIZE=1", "<a@b..com>", "<a%b@c.com>", "<a!b@c.com>"):
        assert ours._getaddr(arg) == theirs._getaddr(arg), arg


async def test_loop_with_100_received_headers_is_refused(relay, sink):
    await relay.start()
    c = await client(relay.port)
    hops = b"".join(b"Received: from hop%d by hop%d; Sun, 22 Nov 2026 10:00:00 +0000\r\n" % (i, i) for i in range(100))
    with pytest.raises(aiosmtplib.SMTPDataError) as e:
        await c.sendmail("alice@example.com", ["carol@ext.test"], hops + simple_message())
    assert e.value.code == 554 and "5.4.6" in e.value.message
    await c.sendmail("alice@example.com", ["carol@ext.test"], hops[: hops.index(b"Received: from hop99")] + simple_message())
    await c.quit()
    assert len(await sink.wait_for(1)) == 1


@pytest.mark.parametrize("trick", [b"\n.\r\n", b"\r.\r", b"\n.\n", b"\r\n.\r", b"\r.\n", b"\n.\r"])
async def test_smuggling_sequences_never_end_data(relay, sink, trick):
    """Only CRLF.CRLF ends DATA: a smuggled second message is delivered inside the first."""
    await relay.start()
    _, w, cmd = await authed_raw(relay.port)
    await cmd(b"MAIL FROM:<alice@example.com>")
    await cmd(b"RCPT TO:<carol@ext.test>")
    assert (await cmd(b"DATA")).startswith(b"354")
    smuggled = (b"From: alice@example.com\r\nSubject: outer\r\n\r\nouter body" + trick +
                b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<victim@ext.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n")
    reply = await cmd(smuggled + b".")
    assert reply.startswith(b"250 2.0.0"), reply
    assert (await cmd(b"QUIT")).startswith(b"221")
    w.close()
    (r,) = await sink.wait_for(1)
    await asyncio.sleep(0.3)
    assert len(sink.received) == 1 and r.rcpt_tos == ["carol@ext.test"]
    assert b"victim@ext.test" in r.data  # inside the one message, never a second envelope


async def test_internal_error_answers_451_without_exception_text(relay, sink):
    await relay.start()
    # Break the database under the relay: the spool commit fails.
    from sqlalchemy import text
    async with relay.service.engine.begin() as conn:
        await conn.execute(text("DROP TABLE crm_jobs"))
        await conn.execute(text("DROP TABLE events"))
    c = await client(relay.port)
    with pytest.raises(aiosmtplib.SMTPDataError) as e:
        await c.sendmail("alice@example.com", ["carol@ext.test"], simple_message())
    assert e.value.code == 451 and e.value.message == "4.3.0 Temporary failure, try again later"
    assert (await c.noop()).code == 250
    c.close()


async def test_smtplib_client_with_auth_login(relay, sink):
    await relay.start()

    def send():
        with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as s:
            s.ehlo()
            s.user, s.password = "alice", PASSWORD
            code, _ = s.auth("LOGIN", s.auth_login)
            assert code == 235
            s.sendmail("alice@example.com", ["carol@ext.test"], simple_message())

    await asyncio.to_thread(send)
    assert len(await sink.wait_for(1)) == 1


async def test_log_bcc_address_is_never_delivered(relay, sink):
    await relay.start()
    c = await client(relay.port)
    await c.sendmail("alice@example.com", ["carol@ext.test", "log@relay.example.test"], simple_message())
    await c.quit()
    (r,) = await sink.wait_for(1)
    await asyncio.sleep(0.3)
    assert len(sink.received) == 1 and r.rcpt_tos == ["carol@ext.test"]
    rows = await relay.rows("SELECT log FROM messages")
    assert rows == [(True,)]
