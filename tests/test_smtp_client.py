"""relay.smtp_client on the wire: pipelining (RFC 2920) where offered and only there, replies read
whole however they arrive, refusals inside a pipelined transaction, dot-stuffing. Scripted
servers over real loopback sockets, and the tests' aiosmtpd upstream."""

from __future__ import annotations

import asyncio

import pytest

from helpers import Sink
from relay.smtp_client import Connection, SmtpError, _stuffed
from relay.upstream import SmtpUpstream
from core.config import UpstreamSection

MESSAGE = b"From: a@example.com\r\nTo: c@ext.test\r\nSubject: x\r\n\r\nHello\r\n"


class Scripted:
    """A TCP server whose per-connection coroutine ``script(reader, writer)`` plays the upstream."""

    def __init__(self, script):
        self.script = script
        self.server = None
        self.port = 0
        self._sessions: list[tuple[asyncio.Task, asyncio.StreamWriter]] = []

    async def _session(self, reader, writer):
        self._sessions.append((asyncio.current_task(), writer))
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        for task, writer in self._sessions:  # every session ends before the loop does
            writer.close()
            try:
                await asyncio.wait_for(task, 2)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
        await self.server.wait_closed()


async def _greet(reader, writer, extensions=("PIPELINING",)):
    writer.write(b"220 scripted.test ESMTP\r\n")
    line = await reader.readline()
    assert line.startswith(b"EHLO ")
    writer.write(b"".join(b"250-" + e.encode() + b"\r\n" for e in ("scripted.test",) + tuple(extensions))
                 + b"250 HELP\r\n")
    await writer.drain()


async def _data(reader) -> bytes:
    body = b""
    while True:
        line = await reader.readline()
        if line == b".\r\n":
            return body
        body += line


def _open(port, timeout=5.0):
    return Connection.open("127.0.0.1", port, local_hostname="relay.test", timeout=timeout)


async def test_with_pipelining_mail_rcpt_and_data_go_out_before_any_reply():
    seen = []

    async def script(reader, writer):
        await _greet(reader, writer)
        # Nothing is answered until all three commands are in: a client waiting for the reply
        # to MAIL would wait for ever (and time out).
        for _ in range(3):
            seen.append(await reader.readline())
        writer.write(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 go on\r\n")
        seen.append(await _data(reader))
        writer.write(b"250 2.0.0 queued\r\n")
        await writer.drain()
        await reader.read()

    async with Scripted(script) as srv:
        conn = await _open(srv.port, timeout=2.0)
        reply, keep = await conn.transaction("a@example.com", "c@ext.test", MESSAGE, ["SIZE=10"], False)
        conn.close()
    assert (reply.code, reply.text, keep) == (250, "2.0.0 queued", True)
    assert seen[:3] == [b"MAIL FROM:<a@example.com> SIZE=10\r\n", b"RCPT TO:<c@ext.test>\r\n", b"DATA\r\n"]
    assert seen[3] == MESSAGE


async def test_without_pipelining_each_command_waits_for_its_reply():
    early = []

    async def script(reader, writer):
        await _greet(reader, writer, extensions=("SIZE 1000000",))
        for reply in (b"250 2.1.0 OK\r\n", b"250 2.1.5 OK\r\n", b"354 go on\r\n"):
            await reader.readline()
            await asyncio.sleep(0.05)  # a pipelining client would have written the next command by now
            try:
                early.append(await asyncio.wait_for(reader.read(1), 0.01))
            except asyncio.TimeoutError:
                pass
            writer.write(reply)
        await _data(reader)
        writer.write(b"250 2.0.0 queued\r\n")
        await reader.read()

    async with Scripted(script) as srv:
        conn = await _open(srv.port)
        reply, keep = await conn.transaction("a@example.com", "c@ext.test", MESSAGE, [], False)
        conn.close()
    assert reply.code == 250 and keep
    assert early == []


async def test_a_refused_recipient_in_a_pipelined_transaction_is_its_answer_and_the_connection_is_reset():
    sink = await Sink().start()
    sink.behaviour.rcpt_replies["nobody@ext.test"] = "550 5.1.1 No such user"
    up = SmtpUpstream(UpstreamSection(url=sink.url, starttls=False, max_connections=1), "relay.test")
    try:
        refused = await up.send("a@example.com", "nobody@ext.test", MESSAGE)
        sent = await up.send("a@example.com", "c@ext.test", MESSAGE)
    finally:
        await up.close()
        await sink.stop()
    assert refused.status == "bounced" and refused.reply == "550 5.1.1 No such user"
    assert sent.status == "sent"
    assert up.connections_opened == 1  # the same connection, reset, carried the next copy
    assert [r.rcpt_tos for r in sink.received] == [["c@ext.test"]]


async def test_a_server_that_takes_data_after_refusing_the_recipient_gets_an_empty_message_ended():
    seen = []

    async def script(reader, writer):
        await _greet(reader, writer)
        for _ in range(3):
            await reader.readline()
        writer.write(b"250 OK\r\n550 5.1.1 No such user\r\n354 go on\r\n")  # a non-conforming server
        seen.append(await reader.readline())  # the client ends the (empty) message at once
        writer.write(b"554 5.5.1 No valid recipients\r\n")
        seen.append(await reader.readline())
        writer.write(b"250 2.0.0 reset\r\n")
        await reader.read()

    async with Scripted(script) as srv:
        conn = await _open(srv.port)
        reply, keep = await conn.transaction("a@example.com", "nobody@ext.test", MESSAGE, [], False)
        conn.close()
    assert (reply.code, reply.text) == (550, "5.1.1 No such user") and keep
    assert seen == [b".\r\n", b"RSET\r\n"]


async def test_a_refused_sender_decides_a_pipelined_transaction():
    async def script(reader, writer):
        await _greet(reader, writer)
        for _ in range(3):
            await reader.readline()
        writer.write(b"553 5.7.1 Sender refused\r\n503 5.5.1 No sender\r\n503 5.5.1 No recipients\r\n")
        assert await reader.readline() == b"RSET\r\n"
        writer.write(b"250 OK\r\n")
        await reader.read()

    async with Scripted(script) as srv:
        conn = await _open(srv.port)
        reply, keep = await conn.transaction("a@example.com", "c@ext.test", MESSAGE, [], False)
        conn.close()
    assert (reply.code, reply.text, keep) == (553, "5.7.1 Sender refused", True)


async def test_replies_are_read_whole_however_the_bytes_arrive():
    async def script(reader, writer):
        for chunk in (b"22", b"0-scripted.test\r", b"\n220 ready\r\n"):  # a multi-line greeting, split
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.01)
        await reader.readline()
        for byte in b"250-scripted.test\r\n250-PIPELINING\r\n250-SIZE 5000\r\n250 HELP\r\n":
            writer.write(bytes([byte]))  # one byte at a time
            await writer.drain()
        for _ in range(3):
            await reader.readline()
        writer.write(b"250 OK\r\n250 OK\r\n354 go on\r\n")
        await _data(reader)
        writer.write(b"250-2.0.0 queued\r\n250 2.0.0 as 42\r\n")
        await reader.read()

    async with Scripted(script) as srv:
        conn = await _open(srv.port)
        assert conn.supports("pipelining") and conn.extensions["size"] == "5000"
        reply, keep = await conn.transaction("a@example.com", "c@ext.test", MESSAGE, [], False)
        conn.close()
    assert (reply.code, reply.text) == (250, "2.0.0 queued\n2.0.0 as 42")


async def test_no_reply_at_all_is_a_timeout_not_a_hang():
    async def script(reader, writer):
        await reader.read()  # says nothing, not even a greeting

    async with Scripted(script) as srv:
        with pytest.raises(TimeoutError):
            await _open(srv.port, timeout=0.3)


@pytest.mark.parametrize("data, sent", [
    (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
    (b".start\r\n..two\r\n", b"..start\r\n...two\r\n.\r\n"),
    (b"no end", b"no end\r\n.\r\n"),
    (b"bare\nlf\n.\n", b"bare\r\nlf\r\n..\r\n.\r\n"),
    (b"bare\rcr\r\n", b"bare\r\ncr\r\n.\r\n"),
    (b"", b".\r\n"),
])
def test_data_is_sent_with_crlf_line_ends_dot_stuffed_and_ended(data, sent):
    assert _stuffed(data) == sent


async def test_dot_lines_arrive_at_the_upstream_as_written():
    sink = await Sink().start()
    up = SmtpUpstream(UpstreamSection(url=sink.url, starttls=False), "relay.test")
    body = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\nend\r\n"
    try:
        assert (await up.send("a@example.com", "c@ext.test", body)).status == "sent"
    finally:
        await up.close()
        await sink.stop()
    assert sink.received[0].data == body


async def test_data_sent_ahead_of_the_starttls_handshake_ends_the_session():
    """The STARTTLS injection: bytes after "220 ready" would be read as if they came over TLS."""
    async def script(reader, writer):
        await _greet(reader, writer, extensions=("STARTTLS",))
        assert await reader.readline() == b"STARTTLS\r\n"
        writer.write(b"220 2.0.0 Ready to start TLS\r\n250 2.1.0 injected\r\n")
        await reader.read()

    import ssl
    async with Scripted(script) as srv:
        with pytest.raises(Exception, match="before TLS began"):
            await Connection.open("127.0.0.1", srv.port, local_hostname="relay.test", timeout=2,
                                  starttls=ssl.create_default_context())


async def test_an_envelope_address_with_a_line_break_is_never_sent():
    sink = await Sink().start()
    up = SmtpUpstream(UpstreamSection(url=sink.url, starttls=False), "relay.test")
    try:
        result = await up.send("a@example.com", "c@ext.test>\r\nRCPT TO:<eve@evil.test", MESSAGE)
    finally:
        await up.close()
        await sink.stop()
    assert result.status == "bounced" and result.reply.startswith("501 5.1.3")
    assert sink.received == []


async def test_an_unreadable_reply_ends_the_session_and_the_copy_is_deferred():
    async def script(reader, writer):
        await _greet(reader, writer)
        for _ in range(3):
            await reader.readline()
        writer.write(b"hello, this is no SMTP\r\n")
        await reader.read()

    async with Scripted(script) as srv:
        up = SmtpUpstream(UpstreamSection(url=f"smtp://127.0.0.1:{srv.port}", starttls=False, timeout_seconds=2),
                          "relay.test")
        result = await up.send("a@example.com", "c@ext.test", MESSAGE)
        await up.close()
    assert result.status == "deferred" and "unreadable reply" in result.reply


async def test_a_pooled_connection_the_server_spoke_on_unasked_is_not_reused():
    connections = []

    async def script(reader, writer):
        connections.append(1)
        await _greet(reader, writer)
        for _ in range(3):
            await reader.readline()
        writer.write(b"250 OK\r\n250 OK\r\n354 go on\r\n")
        await _data(reader)
        writer.write(b"250 2.0.0 queued\r\n")
        await writer.drain()
        if len(connections) == 1:
            writer.write(b"421 4.4.2 Idle too long, closing soon\r\n")  # said unasked, connection kept
        await reader.read()

    async with Scripted(script) as srv:
        up = SmtpUpstream(UpstreamSection(url=f"smtp://127.0.0.1:{srv.port}", starttls=False, timeout_seconds=2),
                          "relay.test")
        assert (await up.send("a@example.com", "c@ext.test", MESSAGE)).status == "sent"
        await asyncio.sleep(0.1)
        second = await up.send("a@example.com", "d@ext.test", MESSAGE)
        await up.close()
    assert second.status == "sent" and len(connections) == 2


# -- found in review: replies out of step, hang-ups after a refusal, bare LF, the STARTTLS race ----

async def _answer(reader, writer, got, ehlo=(), crlf=b"\r\n"):
    """A plain in-order responder: one reply per command line; bodies appended to ``got``."""
    while line := await reader.readline():
        verb = line[:4].upper()
        if verb == b"EHLO":
            writer.write(b"".join(b"250-" + e + crlf for e in (b"srv.test",) + tuple(ehlo)) + b"250 HELP" + crlf)
        elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET"):
            writer.write(b"250 OK" + crlf)
        elif verb == b"DATA":
            writer.write(b"354 go on" + crlf)
            got.append(await _data(reader))
            writer.write(b"250 2.0.0 queued" + crlf)
        elif verb == b"QUIT":
            writer.write(b"221 bye" + crlf)
            return
        else:
            writer.write(b"500 what" + crlf)


def _upstream(port, timeout=2.0):
    return SmtpUpstream(UpstreamSection(url=f"smtp://127.0.0.1:{port}", starttls=False, timeout_seconds=timeout,
                                        max_connections=1), "relay.test")


async def _send(script, timeout=2.0):
    async with Scripted(script) as srv:
        up = _upstream(srv.port, timeout)
        try:
            return await up.send("a@example.com", "c@ext.test", MESSAGE)
        finally:
            await up.close()


async def test_replies_out_of_step_never_report_a_copy_sent_that_was_not():
    got = []

    async def script(reader, writer):  # two greetings: every later reply answers the command before
        writer.write(b"220 srv.test ESMTP\r\n220 srv.test ready\r\n")
        await _answer(reader, writer, got)

    result = await _send(script)
    assert result.status == "deferred" and got == []


async def test_a_2xx_reply_to_data_is_no_delivery():
    got = []

    async def script(reader, writer):
        await _greet(reader, writer)
        for _ in range(3):
            await reader.readline()
        writer.write(b"250 OK\r\n250 OK\r\n250 OK\r\n")  # DATA answered 250, not 354
        await _answer(reader, writer, got)

    result = await _send(script)
    assert result.status == "deferred" and "out of step" in result.reply and got == []


@pytest.mark.parametrize("replies, code", [(b"554 5.7.1 Sender blocked\r\n", "554"),
                                           (b"250 OK\r\n550 5.7.1 Relaying denied\r\n", "550")])
async def test_a_refusal_then_a_hang_up_inside_a_pipelined_group_is_that_refusal(replies, code):
    async def script(reader, writer):  # Exim's "drop": the refusal, then the connection closed
        await _greet(reader, writer)
        for _ in range(3):
            await reader.readline()
        writer.write(replies)
        await writer.drain()
        writer.close()

    result = await _send(script)
    assert result.status == "bounced" and result.reply.startswith(code)


async def test_replies_with_bare_lf_line_ends_are_read():
    got = []

    async def script(reader, writer):
        writer.write(b"220 srv.test ESMTP\n")
        await _answer(reader, writer, got, crlf=b"\n")

    assert (await _send(script, timeout=1.0)).status == "sent" and got == [MESSAGE]


async def test_a_send_cancelled_during_its_retry_on_a_fresh_connection_closes_that_connection():
    sessions, second_closed = [], asyncio.Event()

    async def script(reader, writer):
        sessions.append(1)
        writer.write(b"220 srv.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"250 srv.test\r\n")  # no PIPELINING
        await reader.readline()  # MAIL
        if len(sessions) == 1:
            return  # closed unanswered: the send retries on a fresh connection
        await reader.read()  # the second is never answered: does it see the client close?
        second_closed.set()

    async with Scripted(script) as srv:
        up = _upstream(srv.port, timeout=30)
        task = asyncio.create_task(up.send("a@example.com", "c@ext.test", MESSAGE))
        while len(sessions) < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(second_closed.wait(), 5)
        await up.close()


@pytest.fixture
def self_signed(tmp_path):
    import shutil
    import subprocess
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed (it makes the test's certificate)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_plaintext_arriving_just_after_the_starttls_reply_is_never_read_as_a_tls_reply(self_signed):
    import socket
    import ssl
    cert, key = self_signed
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()  # orders the injection right after the client read the 220
    a.setblocking(False)
    b.setblocking(False)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def script(reader, writer):
        writer.write(b"220 srv.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-srv.test\r\n250-STARTTLS\r\n250 HELP\r\n")
        assert await reader.readline() == b"STARTTLS\r\n"
        injected = asyncio.Event()

        def inject():
            loop.remove_reader(b)
            b.recv(1)
            writer.transport.write(b"250 injected-ehlo-reply\r\n")
            injected.set()
        loop.add_reader(b, inject)
        writer.write(b"220 2.0.0 Ready to start TLS\r\n")
        a.send(b"x")
        await injected.wait()
        await writer.start_tls(server_ctx)
        await _answer(reader, writer, [], ehlo=(b"AUTH PLAIN",))

    try:
        async with Scripted(script) as srv:
            with pytest.raises(SmtpError, match="before TLS began"):
                conn = await Connection.open("127.0.0.1", srv.port, local_hostname="relay.test", timeout=2,
                                             starttls=ssl.create_default_context(cafile=str(cert)))
                await conn.quit()
    finally:
        a.close()
        b.close()


async def test_a_refusal_mid_message_then_a_hang_up_is_that_refusal():
    async def script(reader, writer):  # a large message refused while it is still being sent
        await _greet(reader, writer)
        for _ in range(3):
            await reader.readline()
        writer.write(b"250 OK\r\n250 OK\r\n354 go on\r\n")
        await reader.readexactly(64 * 1024)
        writer.write(b"552 5.3.4 Message too big for this system\r\n")
        await writer.drain()
        writer.transport.abort()

    big = MESSAGE + (b"y" * 998 + b"\r\n") * 8000  # ~8 MB
    async with Scripted(script) as srv:
        up = _upstream(srv.port, timeout=5)
        result = await up.send("a@example.com", "c@ext.test", big)
        await up.close()
    assert result.status == "bounced" and result.reply.startswith("552 5.3.4")
