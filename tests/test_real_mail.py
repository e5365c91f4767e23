"""Mail as real clients send it, over SMTP to the real relay: raw 8-bit header bytes, long lines,
sizes near the upstream's SIZE, the From:/Sender: binding and RFC 5321 envelope paths."""

from __future__ import annotations

import asyncio
import random

import aiosmtplib
import pytest

from helpers import client, simple_message
from test_submission import authed_raw


def _delivered_body(data: bytes) -> bytes:
    """What the sink got, less the Received: and X-Trackrelay-Ref: headers the relay put on top."""
    assert data.startswith(b"Received: ")
    end = data.index(b"\r\n", data.index(b"(trackrelay) with")) + 2
    end = data.index(b"\r\n", end) + 2  # the date line
    if data.startswith(b"X-Trackrelay-Ref: ", end):  # our signed per-copy reference, below it
        end = data.index(b"\r\n", end) + 2
    return data[end:]


EIGHT_BIT = {
    "latin1_subject": b"Subject: caf\xe9 cr\xe8me\r\n",
    "big5_subject": b"Subject: \xa4\xa4\xa4\xe5\xb4\xfa\xb8\xd5\r\n",  # "中文測試" in Big5, unencoded
    "gb2312_subject": b"Subject: \xd6\xd0\xce\xc4\xb2\xe2\xca\xd4\r\n",  # the same in GB2312
    "utf8_subject": "Subject: Grüße aus Köln\r\n".encode(),
    "lone_surrogate_after_decoding": b"Subject: =?utf-7?q?+2AA-?= and =?utf-8?b?7aCA?=\r\n",
    "nul_in_header": b"Subject: nul\x00byte\r\n",
}


def _eight_bit_message(header: bytes, display: bytes = b"Alice") -> bytes:
    return (b"From: " + display + b" <alice@example.com>\r\nTo: carol@ext.test\r\n" + header +
            b"Message-ID: <8bit@example.com>\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\n\r\nBody.\r\n")


@pytest.mark.parametrize("case", sorted(EIGHT_BIT))
async def test_raw_8bit_header_bytes_are_accepted_and_delivered_byte_identical(relay, sink, case):
    await relay.start()
    msg = _eight_bit_message(EIGHT_BIT[case])
    _, w, cmd = await authed_raw(relay.port)
    assert (await cmd(b"MAIL FROM:<alice@example.com> BODY=8BITMIME")).startswith(b"250")
    assert (await cmd(b"RCPT TO:<carol@ext.test>")).startswith(b"250")
    assert (await cmd(b"DATA")).startswith(b"354")
    reply = await cmd(msg + b".")
    assert reply.startswith(b"250 2.0.0"), reply
    w.close()
    (got,) = await sink.wait_for(1)
    assert _delivered_body(got.data) == msg
    ((subject,),) = await relay.rows("SELECT subject FROM messages")
    subject.encode("utf-8")  # storable text: no surrogates, no NUL
    assert "\x00" not in subject


async def test_an_8bit_from_display_name_is_the_users_own_address(relay, sink):
    await relay.start()
    msg = _eight_bit_message(b"Subject: hi\r\n", display=b"Ren\xe9 M\xfcller")
    _, w, cmd = await authed_raw(relay.port)
    await cmd(b"MAIL FROM:<alice@example.com>")
    await cmd(b"RCPT TO:<carol@ext.test>")
    await cmd(b"DATA")
    assert (await cmd(msg + b".")).startswith(b"250 2.0.0")
    w.close()
    (got,) = await sink.wait_for(1)
    assert _delivered_body(got.data) == msg
    ((from_header,),) = await relay.rows("SELECT from_header FROM messages")
    assert from_header == "Ren\ufffd M\ufffdller <alice@example.com>"


async def test_decoded_subjects_are_stored_readably(relay, sink):
    await relay.start()
    c = await client(relay.port)
    for subject in ("=?big5?b?pKSk5Q==?=", "=?utf-8?q?Gr=C3=BC=C3=9Fe?= =?utf-8?q?_aus_K=C3=B6ln?=",
                    "=?x-unknown?q?caf=C3=A9?=", "caf\u00e9"):
        await c.sendmail("alice@example.com", ["carol@ext.test"], simple_message(subject=subject))
    await c.quit()
    rows = [s for (s,) in await relay.rows("SELECT subject FROM messages ORDER BY id")]
    assert rows == ["中文", "Grüße aus Köln", "café", "café"]


async def test_one_users_unstorable_message_never_fails_others_in_the_same_group_commit(relay, sink):
    """The spool's group commit: a value the database refuses fails that message alone (5xx for
    a message that would fail the same way again); the others in its batch are committed."""
    from storage.spool import SpoolEntry, SpoolRecipient
    await relay.start()
    spool = relay.service._spool

    def entry(subject: str, n: int) -> SpoolEntry:
        return SpoolEntry(message_id=f"<m{n}@example.com>", user="alice", mail_from="alice@example.com",
                          raw=simple_message(), subject=subject,
                          recipients=[SpoolRecipient(f"r{n}@ext.test", None, False, False, False, [])])

    # A lone surrogate cannot be encoded by any database driver: before this fix, the handler let
    # raw header bytes through as such, and the whole batch failed with it.
    items = [entry("good", n) for n in range(20)]
    items.insert(7, entry("bad \ud800", 99))
    results = await asyncio.gather(*(spool.submit(e) for e in items), return_exceptions=True)
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [7], results
    rows = await relay.rows("SELECT subject FROM messages")
    assert sorted(s for (s,) in rows) == ["good"] * 20


async def test_concurrent_8bit_messages_never_fail_another_users_messages(relay, sink):
    await relay.start()

    async def send(user: str, n: int) -> str:
        c = await client(relay.port, user=user)
        frm = f"{user}@example.com"
        if user == "alice":
            msg = _eight_bit_message(b"Subject: caf\xe9 " + str(n).encode() + b"\r\n").replace(
                b"<8bit@example.com>", f"<8bit{n}@example.com>".encode())
        else:
            msg = simple_message(frm=frm, subject=f"bob {n}")
        _, reply = await c.sendmail(frm, ["carol@ext.test"], msg)
        await c.quit()
        return reply

    replies = await asyncio.gather(*(send("bob" if n % 2 else "alice", n) for n in range(40)))
    assert all(r.startswith("2.0.0 OK: queued") for r in replies), replies
    await sink.wait_for(40)


def _mutations(seed: int, count: int) -> list[bytes]:
    """Bounded fuzz input: real-looking MIME with bytes flipped, 8-bit bytes and NULs put into
    headers, boundaries doubled or cut, lines joined, and truncation."""
    rnd = random.Random(seed)
    base = (b"From: Alice <alice@example.com>\r\nTo: carol@ext.test\r\nSubject: =?utf-8?q?Hall=C3=B6?=\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n"
            b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHallo\r\n"
            b"--b1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
            b"<html><body><a href=3D\"https://example.com/a?x=3D1\">a</a> <a href=https://e.test/?q=1>b</a>"
            b"</body></html>\r\n--b1--\r\n")
    out = []
    head_end = base.index(b"\r\n\r\n")
    for _ in range(count):
        msg = bytearray(base)
        for _ in range(rnd.randint(1, 6)):
            op = rnd.randrange(6)
            if op == 0:  # a random byte in the header block (never its From: line)
                i = rnd.randrange(40, head_end)
                msg[i] = rnd.choice([0x00, 0x80, 0xA4, 0xE9, 0xFF, 0x3D, 0x3F, 0x22, 0x3C])
            elif op == 1:  # a random byte anywhere after From:
                msg[rnd.randrange(40, len(msg))] = rnd.randrange(256)
            elif op == 2:
                msg = msg.replace(b"--b1--", b"--b1", 1) if rnd.random() < 0.5 else msg.replace(b"--b1\r\n", b"", 1)
            elif op == 3:
                del msg[rnd.randrange(len(base) // 2, len(msg)):]
            elif op == 4:
                msg = msg.replace(b"\r\n", b" ", 1) if rnd.random() < 0.3 else msg + b"x" * rnd.randrange(2000)
            else:
                msg[40:40] = b"X-Fuzz: " + bytes(rnd.randrange(128, 256) for _ in range(rnd.randrange(1, 30))) + b"\r\n"
        # No bare CR/LF tricks with the final dot: SMTP's framing is tested elsewhere.
        out.append(bytes(msg).replace(b"\r\n.", b"\r\n.."))
    return out


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # parsing, not storage: one database
async def test_fuzzed_mime_never_gets_a_451(relay, sink):
    """No message gets a 4xx while the database is up; each one answered 250 is delivered."""
    await relay.start()
    _, w, cmd = await authed_raw(relay.port)
    accepted = 0
    for msg in _mutations(20261207, 120):
        assert (await cmd(b"MAIL FROM:<alice@example.com>")).startswith(b"250")
        assert (await cmd(b"RCPT TO:<carol@ext.test>")).startswith(b"250")
        assert (await cmd(b"DATA")).startswith(b"354")
        body = msg if msg.endswith(b"\r\n") else msg + b"\r\n"
        reply = await cmd(body + b".")
        assert reply[:1] in (b"2", b"5"), (reply, msg)
        accepted += reply.startswith(b"250")
    w.close()
    assert accepted >= 100  # the From: line is never mutated: nearly all are the user's own mail
    await sink.wait_for(accepted, timeout=30)


async def test_lines_up_to_64_kib_are_accepted_and_delivered_as_they_came(relay, sink):
    sink.behaviour.line_length_limit = 70000  # as Postfix, which takes long lines (in pieces)
    await relay.start()
    _, w, cmd = await authed_raw(relay.port)
    for line, expect in ((b"a" * 65537, b"500 5.5.2"), (b"b" * 65536, b"250 2.0.0"), (b"c" * 2048, b"250 2.0.0")):
        await cmd(b"MAIL FROM:<alice@example.com>")
        await cmd(b"RCPT TO:<carol@ext.test>")
        assert (await cmd(b"DATA")).startswith(b"354")
        reply = await cmd(LONG_HEAD + line + b"\r\n.")
        assert reply.startswith(expect), (len(line), reply)
    assert (await cmd(b"NOOP")).startswith(b"250")
    w.close()
    got = await sink.wait_for(2)
    assert sorted(_delivered_body(r.data) for r in got) == [LONG_HEAD + b"b" * 65536 + b"\r\n",
                                                            LONG_HEAD + b"c" * 2048 + b"\r\n"]


LONG_HEAD = b"From: alice@example.com\r\nSubject: long\r\nMessage-ID: <long@example.com>\r\n\r\n"


async def test_a_long_line_in_an_instrumented_html_part_is_reencoded_only_there(relay, sink):
    sink.behaviour.line_length_limit = 70000
    await relay.start()
    html = "<html><body><p>" + "word " * 3000 + '</p><a href="https://example.com/x">x</a></body></html>'
    msg = (f"From: alice@example.com\r\nTo: carol@ext.test\r\nSubject: long html\r\nMIME-Version: 1.0\r\n"
           f"Content-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
           f"{'plain ' * 400}\r\n--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--b--\r\n").encode()
    c = await client(relay.port)
    await c.sendmail("alice@example.com", ["carol@ext.test"], msg)
    await c.quit()
    (got,) = await sink.wait_for(1)
    body = _delivered_body(got.data)
    html_part = body[body.index(b"--b\r\nContent-Type: text/html"):]
    assert max(len(line) for line in html_part.split(b"\r\n")) <= 998
    assert ("plain " * 400).encode() + b"\r\n--b\r\n" in body  # the untouched part, long line and all
    assert b"Content-Transfer-Encoding: quoted-printable" in body


async def test_the_accepted_size_leaves_room_for_what_the_relay_adds(relay, sink):
    sink.behaviour.size = 6000
    await relay.start()
    await asyncio.sleep(0.3)  # the start-up SIZE probe
    c = await client(relay.port)
    ehlo = await c.ehlo()
    advertised = int(ehlo.message.split("SIZE ")[1].split()[0])
    assert advertised <= 6000 - 1024
    msg = simple_message(extra="X-Track: none\r\n")
    msg += b"y" * (advertised - len(msg) - 2) + b"\r\n"
    assert len(msg) == advertised
    await c.sendmail("alice@example.com", ["carol@ext.test"], msg)  # the largest accepted
    await c.quit()
    (got,) = await sink.wait_for(1)
    assert len(got.data) <= 6000


async def test_a_copy_that_wrapping_would_push_past_the_upstreams_size_goes_out_untouched(relay, sink):
    sink.behaviour.size = 20000
    sink.behaviour.line_length_limit = 70000  # the HTML is one line, as it came
    await relay.start()
    await asyncio.sleep(0.3)
    links = "".join(f'<a href="https://example.com/{i}">{i}</a> ' for i in range(220))
    msg = (f"From: alice@example.com\r\nTo: carol@ext.test\r\nSubject: many links\r\nMessage-ID: <big@x>\r\n"
           f"MIME-Version: 1.0\r\n"
           f"Content-Type: text/html; charset=utf-8\r\n\r\n<html><body>{links}</body></html>\r\n").encode()
    assert len(msg) < 11000
    c = await client(relay.port)
    await c.sendmail("alice@example.com", ["carol@ext.test"], msg)
    await c.quit()
    (got,) = await sink.wait_for(1)
    assert _delivered_body(got.data) == msg
    await relay.wait_status({"sent"}, 1)
    ((note,),) = await relay.rows("SELECT render_note FROM recipients")
    assert "would pass the upstream's SIZE 20000" in note


FOREIGN_FROM = {
    "encoded_word_address": "From: =?utf-8?b?Ym9iQGV2aWwudGVzdA==?=",
    "empty": "From: ",
    "group_without_address": "From: undisclosed:;",
    "unclosed_comment": "From: alice(@example.com",
    "percent_hack": "From: bob%evil.test",
    "angle_after_bare": "From: alice@example.com <bob@evil.test>",
    "second_address": "From: alice@example.com, bob@evil.test",
    "sender_of_someone_else": "From: alice@example.com\r\nSender: Bob <bob@evil.test>",
    "empty_sender": "From: alice@example.com\r\nSender: undisclosed:;",
}


@pytest.mark.parametrize("case", sorted(FOREIGN_FROM) + ["missing"])
async def test_a_from_or_sender_without_only_the_users_address_gets_550_571(relay, sink, case):
    await relay.start()
    head = "" if case == "missing" else FOREIGN_FROM[case] + "\r\n"
    msg = f"{head}To: carol@ext.test\r\nSubject: s\r\n\r\nbody\r\n".encode()
    c = await client(relay.port)
    with pytest.raises(aiosmtplib.SMTPDataError) as e:
        await c.sendmail("alice@example.com", ["carol@ext.test"], msg)
    assert e.value.code == 550 and e.value.message.startswith("5.7.1 "), e.value.message
    assert ("From:" in e.value.message) or ("Sender:" in e.value.message)
    assert (await c.noop()).code == 250
    await c.quit()
    await asyncio.sleep(0.2)
    assert sink.received == []


@pytest.mark.parametrize("header", ['From: "bob@evil.test" <alice@example.com>',
                                    "From: =?utf-8?q?Ren=C3=A9?= <ALICE@example.com>",
                                    "From: Alice (Sales) <alice@example.com>",
                                    "From: alice@example.com\r\nSender: alice@example.com"])
async def test_the_users_own_from_is_accepted_whatever_its_display_name(relay, sink, header):
    await relay.start()
    c = await client(relay.port)
    await c.sendmail("alice@example.com", ["carol@ext.test"], f"{header}\r\nSubject: s\r\n\r\nbody\r\n".encode())
    await c.quit()
    assert len(await sink.wait_for(1)) == 1


async def test_a_comment_in_an_envelope_path_is_refused_not_read_as_another_mailbox(relay, sink):
    await relay.start()
    _, w, cmd = await authed_raw(relay.port)
    assert (await cmd(b"MAIL FROM:<ali(x)ce@example.com>")).startswith(b"553 5.1.7")
    assert (await cmd(b"MAIL FROM:<alice@example.com>")).startswith(b"250")
    for bad in (b"<v(comment)ictim@ext.test>", b"<victim@ext.test(c)>", b"<vic tim@ext.test>", b"<victim@ext.test"):
        reply = await cmd(b"RCPT TO:" + bad)
        assert reply.startswith(b"553 5.1.3"), (bad, reply)
    assert (await cmd(b'RCPT TO:<"carol"@ext.test>')).startswith(b"250")
    assert (await cmd(b"DATA")).startswith(b"354")
    assert (await cmd(simple_message() + b".")).startswith(b"250")
    w.close()
    (got,) = await sink.wait_for(1)
    assert got.rcpt_tos[0] in ('"carol"@ext.test', "carol@ext.test")  # one mailbox, two spellings


async def test_a_repeated_recipient_gets_one_copy(relay, sink):
    await relay.start()
    _, w, cmd = await authed_raw(relay.port)
    await cmd(b"MAIL FROM:<alice@example.com>")
    for rcpt in (b"<carol@ext.test>", b"<Carol@EXT.test>", b'<"carol"@ext.test>', b"<dave@ext.test>"):
        assert (await cmd(b"RCPT TO:" + rcpt)).startswith(b"250 2.1.5")
    assert (await cmd(b"DATA")).startswith(b"354")
    assert (await cmd(simple_message() + b".")).startswith(b"250")
    w.close()
    got = await sink.wait_for(2)
    await asyncio.sleep(0.3)
    assert sorted(r.rcpt_tos[0] for r in sink.received) == ["carol@ext.test", "dave@ext.test"]
    assert len(await relay.rows("SELECT id FROM recipients")) == 2
    assert got


async def test_an_idn_recipient_domain_is_checked_with_idna_2008(relay, sink):
    await relay.start()
    _, w, cmd = await authed_raw(relay.port)
    assert (await cmd(b"MAIL FROM:<alice@example.com> SMTPUTF8")).startswith(b"250")
    assert (await cmd("RCPT TO:<kunde@straße.de>".encode())).startswith(b"250")
    assert (await cmd("RCPT TO:<kunde@☃.net>".encode())).startswith(b"553 5.1.3")  # not IDNA 2008
    w.close()



async def test_the_mail_log_has_an_accepted_line_with_the_250s_queue_id(relay, sink, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="trackrelay.mail")
    await relay.start()
    c = await client(relay.port)
    _, reply = await c.sendmail("alice@example.com", ["carol@ext.test", "dave@ext.test"],
                                simple_message(extra="Message-ID: <log1@example.com>\r\n"))
    await c.quit()
    queue_id = reply.rsplit(" ", 1)[1]
    lines = [r.getMessage() for r in caplog.records if r.name == "trackrelay.mail"]
    (accepted,) = [ln for ln in lines if f"queue_id={queue_id} status=accepted" in ln]
    assert "user=alice client=127.0.0.1" in accepted and "recipients=2" in accepted
    assert 'message_id="<log1@example.com>"' in accepted
    assert "carol" not in accepted


_WORD_CHARSETS = ["utf-8", "iso-8859-1", "iso-8859-15", "windows-1252", "koi8-r", "big5", "gb2312",
                  "shift_jis", "euc-kr", "utf-16"]


def test_decoded_headers_agree_with_the_email_packages_policy_default():
    """For well-formed RFC 2047 text, ``message.decoded`` reads what ``email`` with
    ``policy.default`` reads; for any bytes at all it never raises and gives storable text."""
    from email.headerregistry import HeaderRegistry

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from relay import message as m
    registry = HeaderRegistry()

    @st.composite
    def encoded_words(draw):
        charset = draw(st.sampled_from(_WORD_CHARSETS))
        text = draw(st.text(st.characters(codec=None, exclude_categories=("Cs", "Cc")), min_size=1, max_size=12))
        try:
            data = text.encode(charset)
        except UnicodeEncodeError:
            data = text.encode("utf-8")
            charset = "utf-8"
        if draw(st.booleans()):
            import base64
            return f"=?{charset}?b?{base64.b64encode(data).decode()}?="
        q = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else f"={b:02X}" for b in data)
        return f"=?{charset}?q?{q}?="

    @given(st.lists(st.one_of(encoded_words(), st.from_regex(r"[A-Za-z0-9]{1,8}", fullmatch=True)),
                    min_size=1, max_size=5))
    @settings(max_examples=300, deadline=None)
    def agree(parts):
        value = " ".join(parts)
        assert m.decoded(value) == str(registry("subject", value))

    @given(st.binary(max_size=200))
    @settings(max_examples=300, deadline=None)
    def storable(data):
        value = data.decode("utf-8", "surrogateescape").replace("\r", "").replace("\n", "")
        out = m.decoded(value)
        out.encode("utf-8")
        assert "\x00" not in out

    agree()
    storable()


async def test_the_mail_log_has_a_line_when_a_message_is_logged_to_the_crm(relay, sink, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="trackrelay.mail")
    await relay.start()
    c = await client(relay.port)
    _, reply = await c.sendmail("alice@example.com", ["carol@ext.test"], simple_message(extra="X-Log: yes\r\n"))
    await c.quit()
    queue_id = reply.rsplit(" ", 1)[1]
    from helpers import wait_until
    await wait_until(lambda: any(f"queue_id={queue_id} status=crm_logged" in r.getMessage()
                                 for r in caplog.records), 15, "the crm_logged line")
