"""The inbound listener under attack (issue 20, its inbound part), over real SMTP to the real
listener after real messages of ours went to the sink:

- log keys: check-config refuses a short one naming the key; `trackrelay new-log-key` prints one
  it accepts;
- guessing keys: 30 guesses on one connection end in `421 4.7.0` (and the connection closed); a
  client past its budget gets 421 for the right key too;
- scope and proof: with bob's key, a forged reply and forged DSNs about alice's message (even one
  carrying alice's genuine reference) change nothing of alice's; a real DSN returning the headers
  of the copy as the sink got it, sent to alice's log address, records `bounced` by our reference
  alone; a DSN with a reference whose MAC is wrong records nothing; logged incoming mail is marked
  with what proved it.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import aiosmtplib
import pytest

from helpers import base_config, client, to_toml
from test_tracker import HTML_MSG

from relay import reference
from core.links import Keyring

ROOT = Path(__file__).resolve().parent.parent
ALICE_KEY = "k3vq7xw2m5pa9rtz4hbn6cydf8ejsgu0"
BOB_KEY = "bobs-own-key-w8z2q5x7c4v9n3m6l1"


def _users(relay) -> list[dict]:
    users = relay.config_dict()["users"]
    users[0]["log_key"] = ALICE_KEY
    users[1]["log_key"] = BOB_KEY
    return users


async def _start(relay):
    from helpers import free_port
    await relay.start(relay={"inbound_listen": f"127.0.0.1:{free_port()}"}, users=_users(relay),
                      tracking={"scanner_window_seconds": 0})


def _inbound(relay) -> tuple[str, int]:
    host, port = relay.config.relay.inbound_listen.split(":")
    return host, int(port)


async def inbound_send(relay, raw: bytes, key: str, mail_from: str = "", source: str | None = None):
    host, port = _inbound(relay)
    c = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, local_hostname="mx.ext.test", timeout=10,
                        source_address=(source, 0) if source else None)
    await c.connect()
    try:
        return await c.sendmail(mail_from, [f"log+{key}@relay.example.test"], raw)
    finally:
        c.close()


async def _send_offer(relay, message_id: str, rcpts=("carol@ext.test",)) -> dict[str, bytes]:
    """alice's message, delivered: {recipient: the copy as the sink got it}."""
    before = len(relay.sink.received)
    c = await client(relay.port, user="alice", source="127.0.0.2")
    await c.sendmail("alice@example.com", list(rcpts),
                     HTML_MSG.replace(b"Subject: Offer", f"Message-ID: {message_id}\r\nSubject: Offer".encode()))
    await c.quit()
    got = await relay.sink.wait_for(before + len(rcpts))
    await relay.wait_status({"sent"}, len(rcpts))
    return {r.rcpt_tos[0]: r.data for r in got[before:]}


def _head(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def _dsn(returned_headers: bytes, failed: str = "carol@ext.test", status: str = "5.1.1") -> bytes:
    """A DSN as a real MTA (Postfix) writes it, returning the original's headers."""
    return (b"From: MAILER-DAEMON@mx.ext.test (Mail Delivery System)\r\nTo: alice@example.com\r\n"
            b"Subject: Undelivered Mail Returned to Sender\r\nMessage-ID: <dsn-" + os.urandom(4).hex().encode() +
            b"@mx.ext.test>\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
            b"--B\r\nContent-Type: text/plain\r\n\r\nThis is the mail system at host mx.ext.test.\r\n\r\n"
            b"I'm sorry to have to inform you that your message could not\r\nbe delivered to one or more "
            b"recipients.\r\n\r\n<" + failed.encode() + b">: host mx.ext.test said: 550 " + status.encode() +
            b" User unknown\r\n\r\n--B\r\nContent-Type: message/delivery-status\r\n\r\n"
            b"Reporting-MTA: dns; mx.ext.test\r\n\r\nFinal-Recipient: rfc822; " + failed.encode() +
            b"\r\nAction: failed\r\nStatus: " + status.encode() + b"\r\nDiagnostic-Code: smtp; 550 " +
            status.encode() + b" User unknown\r\n\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\n" +
            returned_headers + b"\r\n--B--\r\n")


async def _events(relay, user: str = "alice") -> list[tuple[str, str, str | None]]:
    return [tuple(r) for r in await relay.rows(
        "SELECT e.type, r.address, e.reason FROM events e JOIN recipients r ON r.id = e.recipient_pk "
        "WHERE e.user = :u ORDER BY e.id", u=user)]


# -- log keys ------------------------------------------------------------------------------------

def _check_config(tmp_path: Path, log_key: str) -> subprocess.CompletedProcess:
    cfg = base_config(db_url=f"sqlite+aiosqlite:///{tmp_path}/t.db", relay_port=2525,
                      upstream_url="smtp://127.0.0.1:2526", tmp=tmp_path)
    cfg["users"][0]["log_key"] = log_key
    path = tmp_path / "trackrelay.toml"
    path.write_text(to_toml(cfg))
    return subprocess.run([sys.executable, "-m", "trackrelay.cli", "check-config", "-c", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


@pytest.mark.parametrize("weak", ["b1", "0123456789abcdef0123456789abcde", "a" * 40, "sales-2026"])
def test_a_short_or_guessable_log_key_is_refused_by_check_config_naming_the_key(tmp_path, weak):
    done = _check_config(tmp_path, weak)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "trackrelay.toml: users[0].log_key: too weak" in done.stderr
    assert weak not in done.stderr  # the secret is not printed


def test_new_log_key_prints_a_key_check_config_accepts(tmp_path):
    done = subprocess.run([sys.executable, "-m", "trackrelay.cli", "new-log-key"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    found = re.fullmatch(r'log_key = "([a-z2-7]{32})"\n', done.stdout)
    assert found, done.stdout
    checked = _check_config(tmp_path, found.group(1))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip().endswith(": OK")


def test_two_users_cannot_share_a_log_key(tmp_path):
    from helpers import make_config
    from core.config import ConfigError
    cfg = base_config(db_url=f"sqlite+aiosqlite:///{tmp_path}/t.db", relay_port=2525,
                      upstream_url="smtp://127.0.0.1:2526", tmp=tmp_path)
    cfg["users"][0]["log_key"] = cfg["users"][1]["log_key"] = ALICE_KEY
    with pytest.raises(ConfigError, match=r"users\[1\]\.log_key"):
        make_config(cfg)


# -- guessing ------------------------------------------------------------------------------------

async def _raw_session(relay, source: str | None = None):
    host, port = _inbound(relay)
    r, w = await asyncio.open_connection(host, port, local_addr=(source, 0) if source else None)

    async def reply() -> bytes:
        lines = []
        while True:
            line = await asyncio.wait_for(r.readline(), 10)
            if not line:
                return b"".join(lines)  # closed
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    async def cmd(line: bytes) -> bytes:
        w.write(line + b"\r\n")
        await w.drain()
        return await reply()

    await reply()
    return r, w, cmd


async def test_30_log_key_guesses_on_one_connection_end_in_421(relay, sink):
    await _start(relay)
    r, w, cmd = await _raw_session(relay)
    assert (await cmd(b"EHLO mx.ext.test")).startswith(b"250")
    assert (await cmd(b"MAIL FROM:<>")).startswith(b"250")
    answers = []
    t0 = time.perf_counter()
    for i in range(30):
        try:
            answer = await cmd(b"RCPT TO:<log+guess%04d@relay.example.test>" % i)
        except (ConnectionError, OSError):
            break
        if not answer:
            break  # the connection is closed
        answers.append(answer[:3])
        if answer.startswith(b"421"):
            assert b"4.7.0" in answer
    elapsed = time.perf_counter() - t0
    print(f"guesses answered: {[a.decode() for a in answers]} in {elapsed * 1000:.1f} ms")
    assert answers == [b"550", b"550", b"550", b"421"]
    assert await asyncio.wait_for(r.read(), 5) == b""  # closed by the server
    w.close()


async def test_a_client_past_its_budget_gets_421_even_for_the_right_key(relay, sink):
    await _start(relay)
    for i in range(5):  # one unknown recipient a connection: each 550, each charged to 127.0.0.1
        r, w, cmd = await _raw_session(relay)
        await cmd(b"EHLO mx.ext.test")
        await cmd(b"MAIL FROM:<>")
        assert (await cmd(b"RCPT TO:<log+wrong%d@relay.example.test>" % i)).startswith(b"550 5.7.1")
        w.close()
    r, w, cmd = await _raw_session(relay)
    await cmd(b"EHLO mx.ext.test")
    await cmd(b"MAIL FROM:<>")
    assert (await cmd(f"RCPT TO:<log+{ALICE_KEY}@relay.example.test>".encode())).startswith(b"421 4.7.0")
    w.close()
    # Another client address has its own budget: the right key is accepted from it.
    r, w, cmd = await _raw_session(relay, source="127.0.0.9")
    await cmd(b"EHLO mx.ext.test")
    await cmd(b"MAIL FROM:<>")
    assert (await cmd(f"RCPT TO:<log+{ALICE_KEY}@relay.example.test>".encode())).startswith(b"250")
    w.close()


def test_the_client_budget_is_a_sliding_window_and_bounded():
    from relay.inbound import UnknownBudget, client_key
    now = [0.0]
    b = UnknownBudget(limit=5, window=60, size=100, clock=lambda: now[0])
    for _ in range(5):
        assert not b.spent("198.51.100.7")
        b.charge("198.51.100.7")
    assert b.spent("198.51.100.7")
    now[0] = 60.5
    assert not b.spent("198.51.100.7")
    for i in range(1000):
        b.charge(f"10.0.{i // 256}.{i % 256}")
    assert len(b._seen) == 100
    assert client_key(("2001:db8::1", 25, 0, 0)) == client_key(("2001:db8::ffff", 25, 0, 0)) == "2001:db8::/64"
    assert client_key(("::ffff:192.0.2.1", 25, 0, 0)) == "192.0.2.1"


# -- references ----------------------------------------------------------------------------------

def test_a_reference_verifies_only_as_signed_and_across_key_rotation():
    old, new = Keyring.from_strings(["old-key-0123456789abcdef"]), None
    ref = reference.make(old, 4711)
    assert reference.verify(old, ref) == 4711
    rotated = Keyring.from_strings(["new-key-0123456789abcdef", "old-key-0123456789abcdef"])
    assert reference.verify(rotated, ref) == 4711  # the old key still verifies
    new = reference.make(rotated, 4711)
    assert new != ref and reference.verify(rotated, new) == 4711
    kid, copy_id, sig = ref.split(".")[1:]
    assert reference.verify(old, f"tr1.{kid}.4712.{sig}") is None  # another copy's id
    assert reference.verify(old, f"tr1.{kid}.{copy_id}.{'A' * 22}") is None
    assert reference.verify(Keyring.from_strings(["another-key-0123456789"]), ref) is None
    assert reference.verified(old, [b"> X-Trackrelay-Ref: " + ref.encode() + b"\r\n"]) == {4711}


async def test_every_delivered_copy_carries_its_own_reference(relay, sink):
    await _start(relay)
    copies = await _send_offer(relay, "<refs@example.com>", ("carol@ext.test", "dave@ext.test"))
    ids = dict(await relay.rows("SELECT address, id FROM recipients"))
    keyring = Keyring.from_strings(relay.config.tracker.secret_keys)
    for rcpt, data in copies.items():
        (line,) = re.findall(rb"^X-Trackrelay-Ref: (\S+)\r$", _head(data), re.M)
        assert reference.verify(keyring, line) == ids[rcpt]
        assert data.startswith(b"Received: ")  # right below our Received:
        assert data.split(b"\r\n")[3].startswith(b"X-Trackrelay-Ref: ")


# -- scope and proof -----------------------------------------------------------------------------

async def test_with_bobs_key_forged_replies_and_dsns_change_nothing_of_alices(relay, sink):
    await _start(relay)
    copies = await _send_offer(relay, "<offer-a@example.com>")
    before = await _events(relay)
    assert {t for t, _, _ in before} <= {"queued", "sent"}
    reply = (b"From: Carol <carol@ext.test>\r\nTo: alice@example.com\r\nSubject: Re: Offer\r\n"
             b"Message-ID: <forged-reply@ext.test>\r\nIn-Reply-To: <offer-a@example.com>\r\n"
             b"References: <offer-a@example.com>\r\n\r\nYes, we buy!\r\n")
    await inbound_send(relay, reply, BOB_KEY, mail_from="carol@ext.test")
    # A DSN naming alice's Message-ID, and one carrying the genuine reference of alice's copy.
    await inbound_send(relay, _dsn(b"From: alice@example.com\r\nTo: carol@ext.test\r\n"
                                   b"Message-ID: <offer-a@example.com>\r\nSubject: Offer\r\n"), BOB_KEY)
    await inbound_send(relay, _dsn(_head(copies["carol@ext.test"])), BOB_KEY)
    assert await _events(relay) == before
    assert await relay.rows("SELECT status FROM recipients") == [("sent",)]
    assert await _events(relay, "bob") == []
    # The forged reply is on the timeline as bob's, marked as proving nothing.
    rows = await relay.rows("SELECT l.user, p.proof, p.message_pk FROM logged_emails l "
                            "JOIN inbound_proofs p ON p.logged_pk = l.id WHERE l.direction = 'incoming'")
    assert rows == [("bob", "none", None)]


async def test_a_real_dsn_carrying_our_reference_records_bounced(relay, sink):
    await _start(relay)
    copies = await _send_offer(relay, "<offer-b@example.com>", ("carol@ext.test", "dave@ext.test"))
    # The returned headers of carol's copy as the sink got it, less its Message-ID: only our
    # reference can prove which copy this is.
    head = re.sub(rb"(?im)^Message-ID:.*\r\n", b"", _head(copies["carol@ext.test"]))
    assert b"offer-b" not in head and b"X-Trackrelay-Ref" in head
    await inbound_send(relay, _dsn(head), ALICE_KEY)
    got = [(t, a, reason) for t, a, reason in await _events(relay) if t == "bounced"]
    assert [(t, a) for t, a, _ in got] == [("bounced", "carol@ext.test")]
    assert "status 5.1.1; proof reference" in got[0][2]
    assert dict(await relay.rows("SELECT address, status FROM recipients")) == {
        "carol@ext.test": "bounced", "dave@ext.test": "sent"}
    # Never logged as incoming mail, never a contact.
    assert await relay.rows("SELECT id FROM logged_emails WHERE direction = 'incoming'") == []


async def test_the_dsn_of_an_alias_is_the_referenced_copys(relay, sink):
    """One failure naming an address that is not the copy's (the copy went on to an alias): the
    reference says whose copy it was."""
    await _start(relay)
    copies = await _send_offer(relay, "<offer-c@example.com>")
    await inbound_send(relay, _dsn(_head(copies["carol@ext.test"]), failed="carol.smith@mail.ext.test"), ALICE_KEY)
    assert [(t, a) for t, a, _ in await _events(relay) if t == "bounced"] == [("bounced", "carol@ext.test")]


async def test_a_dsn_with_a_reference_that_does_not_verify_records_nothing(relay, sink):
    await _start(relay)
    copies = await _send_offer(relay, "<offer-d@example.com>")
    head = re.sub(rb"(?im)^Message-ID:.*\r\n", b"", _head(copies["carol@ext.test"]))
    forged = re.sub(rb"(X-Trackrelay-Ref: tr1\.[0-9a-f]{8}\.\d+\.)\S{22}", rb"\1" + b"A" * 22, head)
    assert forged != head
    # and a reference of another copy id, with the MAC of this one
    other = re.sub(rb"(X-Trackrelay-Ref: tr1\.[0-9a-f]{8}\.)(\d+)", lambda m: m.group(1) + b"99999", head)
    before = await _events(relay)
    for returned in (forged, other, b"From: alice@example.com\r\nTo: carol@ext.test\r\nSubject: Offer\r\n"):
        await inbound_send(relay, _dsn(returned), ALICE_KEY)
    assert await _events(relay) == before
    assert await relay.rows("SELECT status FROM recipients") == [("sent",)]


async def test_a_real_reply_is_recorded_and_logged_as_proven(relay, sink):
    await _start(relay)
    await _send_offer(relay, "<offer-e@example.com>")
    (message_pk,), = await relay.rows("SELECT id FROM messages")
    await inbound_send(relay, b"From: Carol <carol@ext.test>\r\nTo: alice@example.com\r\nSubject: Re: Offer\r\n"
                              b"Message-ID: <r1@ext.test>\r\nIn-Reply-To: <offer-e@example.com>\r\n\r\nYes.\r\n",
                       ALICE_KEY, mail_from="carol@ext.test")
    # A colleague of carol's answering in the thread: logged as of the thread, no reply event.
    await inbound_send(relay, b"From: Erin <erin@ext.test>\r\nTo: alice@example.com\r\nSubject: Re: Offer\r\n"
                              b"Message-ID: <r2@ext.test>\r\nReferences: <offer-e@example.com>\r\n\r\nMe too.\r\n",
                       ALICE_KEY, mail_from="erin@ext.test")
    # Mail that cites nothing of ours: logged (it came to alice's own address), proving nothing.
    await inbound_send(relay, b"From: Frank <frank@ext.test>\r\nTo: alice@example.com\r\nSubject: Hello\r\n"
                              b"Message-ID: <r3@ext.test>\r\n\r\nHi.\r\n", ALICE_KEY, mail_from="frank@ext.test")
    assert [(t, a) for t, a, _ in await _events(relay) if t in ("replied", "opened")] == [
        ("opened", "carol@ext.test"), ("replied", "carol@ext.test")]
    rows = await relay.rows("SELECT l.message_id, p.proof, p.message_pk FROM logged_emails l "
                            "JOIN inbound_proofs p ON p.logged_pk = l.id ORDER BY l.id")
    assert rows == [("<r1@ext.test>", "reply", message_pk), ("<r2@ext.test>", "thread", message_pk),
                    ("<r3@ext.test>", "none", None)]
