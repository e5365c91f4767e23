"""Instrumentation end to end through the relay: per-recipient tokens, the switches, DKIM."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import dkim
import pytest

from helpers import client

DATA = Path(__file__).parent / "data"


def body_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


async def send_file(relay, name: str, rcpts: list[str], extra: bytes = b"") -> bytes:
    raw = (DATA / f"{name}.eml").read_bytes()
    raw = extra + raw
    c = await client(relay.port)
    await c.sendmail("alice@example.com", rcpts, raw)
    await c.quit()
    return raw


async def test_two_recipients_get_different_tokens(relay, sink):
    await relay.start()
    await send_file(relay, "table_marketing_template", ["carol@ext.test", "dave@ext.test"])
    got = await relay.sink.wait_for(2)
    tokens = dict(await relay.rows("SELECT address, token FROM recipients"))
    assert tokens["carol@ext.test"] != tokens["dave@ext.test"]
    for r in got:
        mine = tokens[r.rcpt_tos[0]]
        other = [t for a, t in tokens.items() if a != r.rcpt_tos[0]][0]
        assert f"/o/{mine}.gif".encode() in r.data and mine.encode() in r.data
        assert other.encode() not in r.data
        assert len(re.findall(rb"/c/[0-9a-f]{8}\." + mine.encode(), r.data)) == 6  # the products; unsubscribe opts out
    # The parse was shared: one parse for both copies.
    assert relay.service.render.parses == 1


@pytest.mark.parametrize("how", ["x_track_none", "tracking_disabled"])
async def test_untracked_copies_are_byte_identical_to_what_was_sent(relay, sink, how):
    if how == "tracking_disabled":
        await relay.start(tracking={"allow": False})
        raw = await send_file(relay, "table_marketing_template", ["carol@ext.test"], b"X-Track: opens, clicks\r\n")
    else:
        await relay.start()
        raw = await send_file(relay, "table_marketing_template", ["carol@ext.test"], b"X-Track: none\r\n")
    (r,) = await sink.wait_for(1)
    assert body_of(r.data) == body_of(raw)
    ((token, reasons),) = await relay.rows("SELECT token, reasons FROM recipients")
    assert token is None
    reasons = json.loads(reasons) if isinstance(reasons, str) else reasons
    assert ("tracking_disabled" if how == "tracking_disabled" else "x_track:none") in reasons


async def test_x_track_opens_only(relay, sink):
    await relay.start()
    await send_file(relay, "table_marketing_template", ["carol@ext.test"], b"X-Track: opens\r\n")
    (r,) = await sink.wait_for(1)
    assert b"/o/" in r.data and b"/c/" not in r.data


async def test_own_address_and_internal_domain_are_not_instrumented(relay, sink):
    await relay.start()
    raw = await send_file(relay, "table_marketing_template", ["bob@example.com", "team@example.com", "carol@ext.test"])
    got = {r.rcpt_tos[0]: r for r in await sink.wait_for(3)}
    assert body_of(got["bob@example.com"].data) == body_of(raw)
    assert body_of(got["team@example.com"].data) == body_of(raw)
    assert b"/o/" in got["carol@ext.test"].data
    rows = {a: (t, r) for a, t, r in await relay.rows("SELECT address, token, reasons FROM recipients")}
    assert rows["bob@example.com"][0] is None and "own_address" in rows["bob@example.com"][1]
    assert rows["team@example.com"][0] is None and "internal" in rows["team@example.com"][1]


async def test_untouched_message_records_why_with_the_recipient(relay, sink):
    await relay.start()
    await send_file(relay, "multipart_signed_untouched", ["carol@ext.test"])
    await sink.wait_for(1)
    await relay.wait_status({"sent"}, 1)
    ((note,),) = await relay.rows("SELECT render_note FROM recipients")
    assert "signed" in note


@pytest.fixture
def dkim_key(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    key = tmp_path / "dkim.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
    pub = subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"], check=True,
                         capture_output=True).stdout
    import base64
    return key, base64.b64encode(pub).decode()


async def test_dkim_signature_of_a_delivered_instrumented_copy_verifies(relay, sink, dkim_key):
    key, pub = dkim_key
    await relay.start(dkim=[{"domain": "example.com", "selector": "tr1", "private_key_file": str(key)}])
    old_sig = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=old; h=from; bh=x; b=y\r\n"
    await send_file(relay, "table_marketing_template", ["carol@ext.test"], old_sig)
    (r,) = await sink.wait_for(1)
    assert r.data.count(b"DKIM-Signature:") == 1 and b"s=old" not in r.data
    assert b"/o/" in r.data

    def dns(name, timeout=5):
        assert name == b"tr1._domainkey.example.com."
        return f"v=DKIM1; k=rsa; p={pub}".encode()

    assert dkim.verify(r.data, dnsfunc=dns)
    assert b" l=" not in r.data.split(b"\r\n\r\n")[0]
