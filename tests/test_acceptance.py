"""relay.acceptance's steps alone: facts in, verdict out, no listener, no database."""

from __future__ import annotations

from types import SimpleNamespace

from helpers import base_config, make_config, simple_message

from relay import acceptance, replies
from storage.spool import SpoolEntry


def _config(tmp_path):
    return make_config(base_config(db_url=f"sqlite+aiosqlite:///{tmp_path}/t.db", relay_port=2525,
                                   upstream_url="smtp://127.0.0.1:2526", tmp=tmp_path))


def _session(user="alice"):
    return SimpleNamespace(auth_data=user, host_name="client.test", peer=("192.0.2.7", 40000))


def test_user_of_is_the_configured_user_of_the_session(tmp_path):
    config = _config(tmp_path)
    assert acceptance.user_of(config, _session()).name == "alice"
    assert acceptance.user_of(config, _session("nobody")) is None
    assert acceptance.user_of(config, SimpleNamespace(auth_data=None)) is None


def test_refusal_names_the_loop_then_the_sender_binding(tmp_path):
    alice = acceptance.user_of(_config(tmp_path), _session())
    assert acceptance.refusal(acceptance.read(simple_message()), alice) is None
    loop = b"Received: x\r\n" * acceptance.MAX_RECEIVED + simple_message(frm="eve@example.com")
    assert acceptance.refusal(acceptance.read(loop), alice) == replies.LOOP
    assert acceptance.refusal(acceptance.read(b"To: c@ext.test\r\n\r\nHi\r\n"), alice) == replies.FROM_MISSING
    assert "not owned" in acceptance.refusal(acceptance.read(simple_message(frm="eve@example.com")), alice)


def test_recipients_set_the_log_bcc_apart(tmp_path):
    config = _config(tmp_path)
    rcpts = acceptance.recipients(config, ["carol@ext.test", "Log@Relay.Example.Test"])
    assert rcpts.addresses == ["carol@ext.test"] and rcpts.log_bcc
    assert rcpts.lookup_keys() == {"carol@ext.test"}


def test_the_sender_binding_reads_a_repeated_from_value_the_same_every_time(tmp_path):
    alice = acceptance.user_of(_config(tmp_path), _session())
    acceptance._named.cache_clear()
    for _ in range(3):  # the second and third reading come from the cache: the same answers
        assert acceptance.refusal(acceptance.read(simple_message()), alice) is None
        assert "not owned" in acceptance.refusal(acceptance.read(simple_message(frm="eve@example.com")), alice)
        bad = simple_message(frm="alice@")
        assert "not a valid address list" in acceptance.refusal(acceptance.read(bad), alice)
    assert acceptance._named.cache_info().hits >= 6
    long_value = "x" * 600 + "@example.com"  # too long to be kept: read afresh, same rules
    assert "not owned" in acceptance.refusal(acceptance.read(simple_message(frm=long_value)), alice)


def test_contacts_are_looked_up_only_where_tracking_can_apply(tmp_path):
    config = _config(tmp_path)
    rcpts = acceptance.recipients(config, ["Carol@Ext.Test", "dave@ext.test"])
    assert acceptance.contact_keys(config, rcpts) == {"carol@ext.test", "dave@ext.test"}
    off = make_config(base_config(db_url=f"sqlite+aiosqlite:///{tmp_path}/t.db", relay_port=2525,
                                  upstream_url="smtp://127.0.0.1:2526", tmp=tmp_path,
                                  tracking={"allow": False}))
    assert not off.tracking.allow
    assert acceptance.contact_keys(off, rcpts) == set()


def test_decide_gives_the_entry_to_spool(tmp_path):
    config = _config(tmp_path)
    alice = acceptance.user_of(config, _session())
    mail = acceptance.read(simple_message(extra="X-Track: no\r\nX-Log-Associate: deal 7\r\n"))
    rcpts = acceptance.recipients(config, ["carol@ext.test"])
    facts = acceptance.facts(config, mail, rcpts, "alice@example.com", acceptance.NO_CONTACTS)
    received = acceptance.received(config.relay.hostname, _session(), tls=False)
    entry = acceptance.decide(config, mail, facts, rcpts, alice, "alice@example.com", received, "192.0.2.7")
    assert isinstance(entry, SpoolEntry)
    assert entry.raw.startswith(b"Received: from client.test ([192.0.2.7])\r\n\tby relay.example.test")
    assert b"X-Track:" not in entry.raw and b"X-Log-Associate:" not in entry.raw
    assert entry.message_id.endswith("@relay.example.test>") and b"\r\nMessage-ID: <" in entry.raw
    assert [r.address for r in entry.recipients] == ["carol@ext.test"]
    assert entry.recipients[0].token and entry.log_associate == "deal 7"
    assert entry.client_ip == "192.0.2.7" and entry.user == "alice"


def test_replies_of_the_commit():
    assert acceptance.accepted(42) == "250 2.0.0 OK: queued as 42"
    assert acceptance.commit_refusal(ValueError("no")) == replies.UNSTORABLE
