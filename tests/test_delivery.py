"""Delivery to a real aiosmtpd upstream that answers 4xx, 421, 5xx or drops the connection."""

from __future__ import annotations

import asyncio
import email
from email import policy

import pytest

from helpers import client, simple_message, wait_until


async def send(relay, rcpts, msg=None):
    c = await client(relay.port)
    await c.sendmail("alice@example.com", rcpts, msg or simple_message())
    await c.quit()


def dsn_parts(data: bytes):
    msg = email.message_from_bytes(data, policy=policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    return msg, parts


async def events(relay, kind):
    return await relay.rows("SELECT r.address, e.type FROM events e JOIN recipients r ON r.id = e.recipient_pk "
                            "WHERE e.type = :t ORDER BY e.id", t=kind)


async def test_sent_event_recorded_per_recipient(relay, sink):
    await relay.start()
    await send(relay, ["carol@ext.test", "dave@ext.test"])
    await relay.wait_status({"sent"}, 2)
    assert sorted(a for a, _ in await events(relay, "queued")) == ["carol@ext.test", "dave@ext.test"]
    assert sorted(a for a, _ in await events(relay, "sent")) == ["carol@ext.test", "dave@ext.test"]


async def test_4xx_defers_and_retries_until_delivered(relay, sink):
    sink.behaviour.data_replies.extend(["451 4.3.0 Try again", "452 4.7.1 Throttled, slow down"])
    await relay.start()
    await send(relay, ["carol@ext.test"])
    (r,) = await sink.wait_for(1)
    assert r.rcpt_tos == ["carol@ext.test"]
    await relay.wait_status({"sent"}, 1)
    assert [t for _, t in await events(relay, "deferred")] == ["deferred", "deferred"]
    (attempts,) = (await relay.rows("SELECT attempts FROM recipients"))[0]
    assert attempts == 3


async def test_421_at_rcpt_defers_and_retries_on_a_new_connection(relay, sink):
    await relay.start()
    sink.behaviour.rcpt_replies["carol@ext.test"] = "421 4.7.0 Closing, too busy"
    await send(relay, ["carol@ext.test"])
    await asyncio.sleep(0.5)
    assert await events(relay, "deferred")
    del sink.behaviour.rcpt_replies["carol@ext.test"]
    await sink.wait_for(1)
    assert sink.handler.connections >= 2


async def test_connection_dropped_after_final_dot_defers_and_delivers_later(relay, sink):
    sink.behaviour.drop_after_dot = 1
    await relay.start()
    await send(relay, ["carol@ext.test"])
    await sink.wait_for(1)
    await relay.wait_status({"sent"}, 1)
    assert len(await events(relay, "deferred")) == 1


async def test_upstream_down_defers_then_delivers_when_it_is_back(relay, sink):
    port = sink.port
    await sink.stop()
    await relay.start()
    await send(relay, ["carol@ext.test"])
    await asyncio.sleep(0.6)
    assert await events(relay, "deferred")
    await sink.start(port)
    await sink.wait_for(1)


async def test_5xx_for_some_recipients_bounces_just_those_with_one_dsn(relay, sink):
    sink.behaviour.rcpt_replies["nobody@ext.test"] = "550 5.1.1 No such user"
    sink.behaviour.rcpt_replies["gone@ext.test"] = "551 5.1.6 Moved"
    await relay.start()
    await send(relay, ["carol@ext.test", "nobody@ext.test", "gone@ext.test"],
               simple_message(extra="Message-ID: <orig-1@example.com>\r\n"))
    got = await sink.wait_for(2, timeout=15)
    dsn = [r for r in got if r.rcpt_tos == ["alice@example.com"]]
    assert len(dsn) == 1
    assert dsn[0].mail_from in ("", "<>")  # from <>
    msg, parts = dsn_parts(dsn[0].data)
    assert msg["Auto-Submitted"] == "auto-replied"
    status = parts[1].get_payload()[0].as_string() if parts[1].is_multipart() else parts[1].get_payload()
    text = dsn[0].data.decode()
    assert "Final-Recipient: rfc822; nobody@ext.test" in text and "Status: 5.1.1" in text
    assert "Final-Recipient: rfc822; gone@ext.test" in text and "Status: 5.1.6" in text
    assert "carol@ext.test" not in text.split("message/delivery-status")[1].split("text/rfc822-headers")[0]
    assert "Message-ID: <orig-1@example.com>" in text  # original headers are returned
    del status
    assert sorted(a for a, _ in await events(relay, "bounced")) == ["gone@ext.test", "nobody@ext.test"]
    assert [r.rcpt_tos for r in got if r.rcpt_tos != ["alice@example.com"]] == [["carol@ext.test"]]


async def test_dsn_from_setting_is_the_envelope_sender_of_dsns(relay, sink):
    sink.behaviour.rcpt_replies["nobody@ext.test"] = "550 5.1.1 No such user"
    await relay.start(queue={"dsn_from": "postmaster@relay.example.test"})
    await send(relay, ["nobody@ext.test"])
    (dsn,) = await sink.wait_for(1)
    assert dsn.mail_from == "postmaster@relay.example.test" and dsn.rcpt_tos == ["alice@example.com"]


async def test_no_dsn_about_a_dsn(relay, sink):
    sink.behaviour.rcpt_replies["nobody@ext.test"] = "550 5.1.1 No such user"
    sink.behaviour.rcpt_replies["alice@example.com"] = "550 5.1.1 Sender mailbox gone too"
    await relay.start()
    await send(relay, ["nobody@ext.test"])
    await relay.wait_status({"bounced"}, 2)  # the copy, then the DSN about it
    await asyncio.sleep(1.0)
    rows = await relay.rows("SELECT kind, count(*) FROM messages GROUP BY kind ORDER BY kind")
    assert rows == [("dsn", 1), ("mail", 1)]
    assert sink.received == []


async def test_message_past_max_age_bounces_with_dsn(relay, sink):
    sink.behaviour.rcpt_replies["slow@ext.test"] = "450 4.2.0 Mailbox busy"
    # 0.0005 h = 1.8 s: a couple of retries, then the age is exceeded.
    await relay.start(queue={"max_age_hours": 0.0005})
    await send(relay, ["slow@ext.test"])
    (dsn,) = await sink.wait_for(1, timeout=15)
    assert dsn.rcpt_tos == ["alice@example.com"]
    text = dsn.data.decode()
    assert "Final-Recipient: rfc822; slow@ext.test" in text and "Status: 4.4.7" in text
    assert "450 4.2.0 Mailbox busy" in text


async def test_copies_to_one_upstream_reuse_pooled_connections(relay, sink):
    await relay.start(upstream={"max_connections": 2})
    await send(relay, [f"r{i}@ext.test" for i in range(20)])
    await sink.wait_for(20)
    assert sink.handler.connections <= 3  # two lanes plus the start-up SIZE probe


async def test_max_messages_per_minute_paces_sending(relay, sink):
    await relay.start(upstream={"max_messages_per_minute": 300})  # one every 0.2 s
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await send(relay, [f"r{i}@ext.test" for i in range(6)])
    await sink.wait_for(6)
    assert loop.time() - t0 >= 0.9


async def test_purge_drops_spooled_bytes_of_delivered_messages(relay, sink):
    await relay.start(queue={"keep_delivered_days": 0})
    await send(relay, ["carol@ext.test"])
    await relay.wait_status({"sent"}, 1)
    await asyncio.sleep(0.2)
    purged = await relay.service.maintenance.purge()
    assert purged == 1
    assert await relay.rows("SELECT raw IS NULL, purged_at IS NOT NULL FROM messages") == [(True, True)]


async def test_crm_job_committed_with_the_message(relay, sink):
    await relay.start()
    await send(relay, ["carol@ext.test"])
    assert await relay.rows("SELECT state FROM crm_jobs") in ([("pending",)], [("done",)])
    await send(relay, ["carol@ext.test"], simple_message(extra="X-Log: no\r\n"))
    assert len(await relay.rows("SELECT id FROM crm_jobs")) == 1


@pytest.mark.parametrize("action", ["retry", "bounce"])
async def test_queue_cli_lists_retries_and_bounces(relay, sink, action, tmp_path):
    from helpers import to_toml
    from trackrelay.cli import main

    sink.behaviour.rcpt_replies["slow@ext.test"] = "450 4.2.0 Mailbox busy"
    await relay.start(queue={"retry_initial_seconds": 3600, "retry_max_seconds": 3600})
    await send(relay, ["slow@ext.test"])
    await relay.wait_status({"deferred"}, 1)
    cfg = tmp_path / "trackrelay.toml"
    cfg.write_text(to_toml(relay.config_dict(queue={"retry_initial_seconds": 3600, "retry_max_seconds": 3600})))
    (rid,) = (await relay.rows("SELECT id FROM recipients"))[0]
    assert await asyncio.to_thread(main, ["-c", str(cfg), "queue", "list"]) == 0
    if action == "retry":
        del sink.behaviour.rcpt_replies["slow@ext.test"]
        assert await asyncio.to_thread(main, ["-c", str(cfg), "queue", "retry", str(rid)]) == 0
        relay.service.worker.wake()
        (r,) = await sink.wait_for(1)
        assert r.rcpt_tos == ["slow@ext.test"]
    else:
        assert await asyncio.to_thread(main, ["-c", str(cfg), "queue", "bounce", str(rid)]) == 0
        relay.service.maintenance.wake()
        (dsn,) = await sink.wait_for(1)
        assert dsn.rcpt_tos == ["alice@example.com"]


async def test_lease_of_a_copy_in_delivery_is_renewed_while_the_upstream_is_slow(relay, sink):
    """A copy stays claimed while its upstream takes longer than a renewal period: its lease moves
    on (no other worker may take it meanwhile), and it is delivered once."""
    sink.behaviour.data_delay = 4.0
    await relay.start(queue={"lease_seconds": 5})
    await send(relay, ["carol@ext.test"])
    await asyncio.sleep(0.3)
    ((status, first),) = await relay.rows("SELECT status, lease_until FROM recipients")
    assert status == "sending"
    await asyncio.sleep(3.0)  # past one renewal period (lease_seconds / 3)
    ((status, later),) = await relay.rows("SELECT status, lease_until FROM recipients")
    assert status == "sending" and later > first
    await relay.wait_status({"sent"}, 1)
    assert len(await sink.wait_for(1)) == 1


async def _send_utf8(relay, rcpt: str):
    c = await client(relay.port)
    await c.mail("alice@example.com", options=["SMTPUTF8"], encoding="utf-8")
    await c.rcpt(rcpt, encoding="utf-8")
    await c.data(simple_message(to="Jürgen <j@ext.test>"))
    await c.quit()


async def test_internationalised_recipient_goes_on_with_smtputf8(relay, sink):
    await relay.start()
    await _send_utf8(relay, "jürgen@ext.test")
    (r,) = await sink.wait_for(1)
    assert r.rcpt_tos == ["jürgen@ext.test"]
    await relay.wait_status({"sent"}, 1)


async def test_internationalised_recipient_bounces_when_the_upstream_lacks_smtputf8(relay, sink):
    """No upstream without SMTPUTF8 can take it: a bounce with a DSN, and the worker carries on."""
    sink.behaviour.smtputf8 = False
    await relay.start()
    await _send_utf8(relay, "jürgen@ext.test")
    await relay.wait_status({"bounced"}, 1)
    ((reply,),) = await relay.rows("SELECT last_reply FROM recipients WHERE address = :a", a="jürgen@ext.test")
    assert reply.startswith("553 5.6.7")
    await send(relay, ["carol@ext.test"])  # the lanes are all alive: later mail still flows
    received = await sink.wait_for(2)
    dsn_msg, _ = dsn_parts(next(r.data for r in received if r.rcpt_tos == ["alice@example.com"]))
    assert any(r.rcpt_tos == ["carol@ext.test"] for r in received)
    assert all(not t.done() for t in relay.service.worker._tasks)


async def test_stop_during_a_maintenance_step_does_not_wait_out_the_maintenance_interval(relay, sink, monkeypatch):
    """stop() wakes the maintenance loop; a wake-up that comes while a step (DSNs, purges) runs
    must not be cleared after it, or the loop sleeps its 30 s interval and the stop waits until
    it is cancelled (10 s)."""
    from relay.maintenance import Maintenance
    in_step = asyncio.Event()
    write_dsns = Maintenance.write_dsns

    async def slow_write_dsns(self):
        in_step.set()
        await asyncio.sleep(0.5)  # a step that takes a while, as a purge of a big spool does
        return await write_dsns(self)

    monkeypatch.setattr(Maintenance, "write_dsns", slow_write_dsns)
    await relay.start()
    await asyncio.wait_for(in_step.wait(), 10)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await relay.stop()
    assert loop.time() - t0 < 3.0


# -- the mail log -------------------------------------------------------------------------------

def _queue_id(response: str) -> int:
    import re
    return int(re.search(r"queued as (\d+)", response).group(1))


async def _send_for_id(relay, rcpts, msg=None) -> int:
    c = await client(relay.port)
    _, response = await c.sendmail("alice@example.com", rcpts, msg or simple_message())
    await c.quit()
    return _queue_id(response)


def _mail_lines(caplog, queue_id: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "trackrelay.mail" and f"queue_id={queue_id} " in r.getMessage() + " "]


async def _start_with_recipients_shown(relay, mode: str, **sections):
    """log.recipients when the config has the key; until then the worker's setting directly."""
    import dataclasses

    from core.config import LogSection
    if "recipients" in {f.name for f in dataclasses.fields(LogSection)}:
        sections.setdefault("log", {})["recipients"] = mode
        await relay.start(**sections)
    else:
        await relay.start(**sections)
        relay.service.worker._recipients_shown = mode


async def test_mail_log_has_a_line_per_attempt_and_dsn_found_by_the_queue_id(relay, sink, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="trackrelay.mail")
    sink.behaviour.data_replies.append("451 4.3.0 Try again")
    sink.behaviour.rcpt_replies["nobody@ext.test"] = "550 5.1.1 <nobody@ext.test>: No such user"
    await relay.start()
    qid = await _send_for_id(relay, ["carol@ext.test", "nobody@ext.test"])
    await relay.wait_status({"sent"}, 2)  # carol's copy and the DSN
    await wait_until(lambda: any("status=dsn" in line for line in _mail_lines(caplog, qid)), 10, "the DSN line")
    lines = _mail_lines(caplog, qid)
    carol = [line for line in lines if f"copy={qid}.1 " in line]
    assert [line.split("status=")[1].split()[0] for line in carol] == ["deferred", "sent"]
    assert 'reply="451 4.3.0 Try again"' in carol[0] and "attempt=1" in carol[0] and "next_attempt=" in carol[0]
    assert 'reply="250 2.0.0 OK"' in carol[1] and "attempt=2" in carol[1] and "delay=" in carol[1]
    (bounced,) = [line for line in lines if f"copy={qid}.2 " in line]
    assert "status=bounced" in bounced and 'reply="550 5.1.1 <*@ext.test>: No such user"' in bounced
    (dsn_line,) = [line for line in lines if "status=dsn" in line]
    dsn_id = int(dsn_line.split("dsn_queue_id=")[1].split()[0])
    # The DSN's own delivery is logged under its queue id.
    await wait_until(lambda: any("status=sent" in line for line in _mail_lines(caplog, dsn_id)), 10, "DSN sent")
    # log.recipients defaults to "domain": no address in full.
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "to=<*@ext.test>" in text and "carol@" not in text and "nobody@" not in text


@pytest.mark.parametrize("mode", ["full", "domain", "none"])
async def test_mail_log_never_names_a_never_log_recipient(relay, sink, caplog, mode):
    import logging
    caplog.set_level(logging.INFO)  # every logger at the level a production log shows (logs.setup)
    sink.behaviour.rcpt_replies["secret@ext.test"] = "550 5.1.1 secret@ext.test: mailbox unknown"
    await _start_with_recipients_shown(relay, mode, never_log={"team": ["secret@ext.test"]})
    qid = await _send_for_id(relay, ["carol@ext.test", "Secret@ext.test"])
    await relay.wait_status({"sent", "bounced"}, 3)  # carol's, the bounce, the DSN
    await wait_until(lambda: any("status=dsn" in line for line in _mail_lines(caplog, qid)), 10, "the DSN line")
    lines = _mail_lines(caplog, qid)
    assert len([line for line in lines if " copy=" in line]) == 2  # one attempt per copy
    assert len([line for line in lines if "status=dsn" in line]) == 1
    text = "\n".join(r.getMessage() for r in caplog.records).lower()
    assert "secret@" not in text
    (secret_line,) = [line for line in lines if f"copy={qid}.2 " in line]
    assert "to=<*>" in secret_line and 'reply="550 5.1.1 *: mailbox unknown"' in secret_line
    (carol_line,) = [line for line in lines if f"copy={qid}.1 " in line]
    shown = {"full": "to=<carol@ext.test>", "domain": "to=<*@ext.test>", "none": "to=<*>"}[mode]
    assert shown in carol_line
