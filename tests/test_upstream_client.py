"""The upstream SMTP client (relay.upstream.SmtpUpstream) against real aiosmtpd servers on loopback.

Only the public interface is used — ``SmtpUpstream(cfg, local_hostname)``, ``send(mail_from, rcpt,
data) -> Result(status, reply)``, ``advertised_size()``, ``close()`` — and everything is checked on
the server side (what arrived, the MAIL options, TLS, AUTH, how many connections were opened), so the
same tests hold for any implementation of that interface. No network mocks.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from core.config import UpstreamSection
from helpers import wait_until
from relay.upstream import SmtpUpstream

FROM = "alice@example.com"
TO = "carol@ext.test"
USER, PASSWORD = "relayuser", "relay-s3cret"
#: a hang guard only (the tests' upstreams answer in milliseconds), never a timing assertion
HANG = 10.0


def message(body: bytes = b"Hello.\r\n", subject: str = "Hi") -> bytes:
    return (f"From: {FROM}\r\nTo: {TO}\r\nSubject: {subject}\r\nMessage-ID: <m1@example.com>\r\n\r\n"
            .encode() + body)


def as_received(data: bytes) -> bytes:
    """What the upstream must hold: the same bytes, a final CRLF added when the last line had none."""
    return data if data.endswith(b"\r\n") else data + b"\r\n"


# ---------------------------------------------------------------------------------------------------
# The upstream: a real aiosmtpd server that records everything it sees.


@dataclass
class Got:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    tls: bool


def _on_tls(server: SMTP, session) -> bool:
    transport = server.transport
    return session.ssl is not None or (transport is not None
                                       and transport.get_extra_info("ssl_object") is not None)


class Recorder:
    """aiosmtpd handler: records each MAIL and each delivered message; refuses on request."""

    def __init__(self, *, mail_reply: str | None = None, rcpt_replies: dict[str, str] | None = None,
                 data_replies: list[str] | None = None):
        self.mail_reply = mail_reply
        self.rcpt_replies = rcpt_replies or {}
        self.data_replies: deque[str] = deque(data_replies or [])
        self.received: list[Got] = []
        self.mails: list[tuple[str, list[str], bool]] = []  # every MAIL FROM seen: (address, options, tls)
        # (no attribute may start with "auth_": aiosmtpd takes those for AUTH mechanisms)
        self.mechanisms_used: list[str] = []  # the mechanisms of successful AUTHs
        self.failed_logins = 0
        self.connections = 0

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mails.append((address, list(mail_options), _on_tls(server, session)))
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_replies:
            return self.data_replies.popleft()
        self.received.append(Got(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content,
                                 list(envelope.mail_options), _on_tls(server, session)))
        return "250 2.0.0 OK queued"

    def authenticator(self, server, session, envelope, mechanism, auth_data):
        ok = (isinstance(auth_data, LoginPassword)
              and auth_data.login == USER.encode() and auth_data.password == PASSWORD.encode())
        if ok:
            self.mechanisms_used.append(mechanism)
            return AuthResult(success=True)
        self.failed_logins += 1
        return AuthResult(success=False, handled=False)  # aiosmtpd answers 535 5.7.8


class ReorderedEhlo(Recorder):
    """EHLO answered with SIZE in the middle of the reply and SMTPUTF8 on its last line."""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return ["250-upstream.test greets you", "250-8BITMIME", "250-SIZE 40000", "250-PIPELINING",
                "250-ENHANCEDSTATUSCODES", "250 SMTPUTF8"]


class NoEhloSMTP(SMTP):
    """An old server: EHLO is an unknown command, HELO works."""

    async def smtp_EHLO(self, arg):
        await self.push("500 5.5.1 Command unrecognized: EHLO")


class Upstream:
    def __init__(self, handler: Recorder, server: asyncio.base_events.Server, protocols: list[SMTP],
                 scheme: str):
        self.handler = handler
        self._server = server
        self.protocols = protocols
        self.port = server.sockets[0].getsockname()[1]
        self.url = f"{scheme}://127.0.0.1:{self.port}"

    @property
    def received(self) -> list[Got]:
        return self.handler.received

    @property
    def connections(self) -> int:
        return self.handler.connections

    def drop_connections(self) -> None:
        """The server closes every open connection (an idle timeout on its side)."""
        for proto in self.protocols:
            if proto.transport is not None:
                proto.transport.close()

    async def stop(self) -> None:
        self._server.close()
        self.drop_connections()
        await asyncio.sleep(0)


@pytest.fixture
async def upstreams():
    """``await start(handler=None, *, size=None, smtputf8=False, starttls=None, implicit_tls=None,
    auth=False, smtp_class=SMTP)`` -> a running Upstream; all stopped afterwards."""
    running: list[Upstream] = []

    async def start(handler: Recorder | None = None, *, size: int | None = None, smtputf8: bool = False,
                    starttls: ssl.SSLContext | None = None, implicit_tls: ssl.SSLContext | None = None,
                    auth: bool = False, smtp_class: type[SMTP] = SMTP) -> Upstream:
        handler = handler or Recorder()
        protocols: list[SMTP] = []
        extra = {}
        if auth:
            # AUTH over TLS only when the server offers STARTTLS (then AUTH is advertised after it)
            extra = dict(auth_required=True, auth_require_tls=starttls is not None,
                         authenticator=handler.authenticator)

        def factory():
            handler.connections += 1
            with warnings.catch_warnings():  # "Requiring AUTH while not requiring TLS": on purpose
                warnings.simplefilter("ignore", UserWarning)
                proto = smtp_class(handler, hostname="upstream.test", data_size_limit=size,
                                   enable_SMTPUTF8=smtputf8, tls_context=starttls, require_starttls=False,
                                   **extra)
            protocols.append(proto)
            return proto

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0, ssl=implicit_tls)
        up = Upstream(handler, server, protocols, "smtps" if implicit_tls else "smtp")
        running.append(up)
        return up

    yield start
    for up in running:
        await up.stop()


@pytest.fixture
async def clients():
    """``client(url, **upstream_section)`` -> an SmtpUpstream (closed afterwards). Build it AFTER any
    SSL_CERT_FILE change: the trust store may be read when it is built."""
    made: list[SmtpUpstream] = []

    def client(url: str, **kw) -> SmtpUpstream:
        kw.setdefault("starttls", False)
        kw.setdefault("timeout_seconds", 5.0)
        kw.setdefault("max_connections", 1)
        up = SmtpUpstream(UpstreamSection(url=url, **kw), "relay.test")
        made.append(up)
        return up

    yield client
    for up in made:
        await asyncio.wait_for(up.close(), HANG)


async def send(up: SmtpUpstream, data: bytes, mail_from: str = FROM, rcpt: str = TO):
    return await asyncio.wait_for(up.send(mail_from, rcpt, data), HANG)


# ---------------------------------------------------------------------------------------------------
# Certificates: a throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI.


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that did not sign the server's certificate

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=trackrelay test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash")
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = _make_ca(d, "ca")
    other_ca, _ = _make_ca(d, "other-ca")
    key, csr, cert, ext = d / "server.key", d / "server.csr", d / "server.pem", d / "server.ext"
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return Pki(ca=ca, cert=cert, key=key, other_ca=other_ca)


# ---------------------------------------------------------------------------------------------------
# 1. Plain delivery, byte-exact, dot-stuffing


BODIES = {
    "plain": message(b"Hello Carol,\r\n\r\nsee you.\r\n"),
    "lines-starting-with-dots": message(b".hidden line\r\n..two dots\r\n...three\r\nnormal\r\n. space\r\n"),
    "a-line-that-is-only-a-dot": message(b"before\r\n.\r\nafter\r\n"),
    "dot-lines-at-the-very-end": message(b"text\r\n.\r\n..\r\n"),
    "last-line-without-crlf": message(b"first line\r\nno newline at the end"),
    "last-line-a-dot-without-crlf": message(b"first line\r\n."),
    "8bit-utf8": message("Grüße aus Köln — ça va? 日本語 ✓\r\n.ñ starts with a dot\r\n".encode()),
}


@pytest.mark.parametrize("data", list(BODIES.values()), ids=list(BODIES))
async def test_delivery_arrives_byte_exact_with_envelope(upstreams, clients, data):
    up = await upstreams()
    client = clients(up.url)
    result = await send(client, data)
    assert result.status == "sent", result
    assert result.reply.startswith("250"), result
    assert len(up.received) == 1
    got = up.received[0]
    assert got.mail_from == FROM
    assert got.rcpt_tos == [TO]
    assert got.data == as_received(data)


# ---------------------------------------------------------------------------------------------------
# 2. SIZE


async def test_size_parameter_sent_in_mail_from_when_upstream_advertises_size(upstreams, clients):
    up = await upstreams(size=100_000)
    data = message(b"x" * 500 + b"\r\n")
    result = await send(clients(up.url), data)
    assert result.status == "sent", result
    sizes = [o for o in up.received[0].mail_options if o.startswith("SIZE=")]
    assert len(sizes) == 1, up.received[0].mail_options
    assert int(sizes[0].removeprefix("SIZE=")) >= len(data)


async def test_no_size_parameter_when_upstream_does_not_advertise_size(upstreams, clients):
    up = await upstreams(size=None)
    result = await send(clients(up.url), message())
    assert result.status == "sent", result
    assert not [o for o in up.received[0].mail_options if o.startswith("SIZE")], up.received[0].mail_options


async def test_advertised_size_returns_the_number_the_upstream_advertises(upstreams, clients):
    up = await upstreams(size=123_456)
    assert await asyncio.wait_for(clients(up.url).advertised_size(), HANG) == 123_456


async def test_advertised_size_is_none_when_upstream_advertises_no_size(upstreams, clients):
    up = await upstreams(size=None)
    assert await asyncio.wait_for(clients(up.url).advertised_size(), HANG) is None


async def test_advertised_size_is_none_when_upstream_is_unreachable(upstreams, clients):
    up = await upstreams()
    url = up.url
    await up.stop()  # nothing listens on that port any more
    assert await asyncio.wait_for(clients(url).advertised_size(), HANG) is None


async def test_advertised_size_is_none_when_upstream_never_answers(silent_server, clients):
    assert await asyncio.wait_for(clients(silent_server, timeout_seconds=0.5).advertised_size(), HANG) is None


# ---------------------------------------------------------------------------------------------------
# 3. STARTTLS


async def test_starttls_delivers_over_tls_when_upstream_certificate_is_trusted(upstreams, clients, pki,
                                                                              monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    up = await upstreams(starttls=pki.server_context())
    data = message(b"over TLS\r\n")
    result = await send(clients(up.url, starttls=True), data)
    assert result.status == "sent", result
    assert len(up.received) == 1
    assert up.received[0].tls, "the message arrived in plaintext"
    assert up.received[0].data == data
    assert all(tls for _, _, tls in up.handler.mails)


async def test_starttls_required_but_not_offered_defers_and_sends_nothing_in_plaintext(upstreams, clients,
                                                                                     pki, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    up = await upstreams(starttls=None)
    result = await send(clients(up.url, starttls=True), message(b"secret\r\n"))
    assert result.status == "deferred", result
    assert up.received == []
    assert up.handler.mails == [], "MAIL FROM went out in plaintext"


async def test_starttls_with_untrusted_certificate_defers_and_sends_nothing(upstreams, clients, pki,
                                                                           monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    up = await upstreams(starttls=pki.server_context())
    result = await send(clients(up.url, starttls=True), message(b"secret\r\n"))
    assert result.status == "deferred", result
    assert up.received == []
    assert up.handler.mails == []


async def test_starttls_with_certificate_of_another_ca_defers_and_sends_nothing(upstreams, clients, pki,
                                                                              monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.other_ca))
    up = await upstreams(starttls=pki.server_context())
    result = await send(clients(up.url, starttls=True), message(b"secret\r\n"))
    assert result.status == "deferred", result
    assert up.received == []
    assert up.handler.mails == []


# ---------------------------------------------------------------------------------------------------
# 4. Implicit TLS


async def test_implicit_tls_smtps_url_delivers_over_tls(upstreams, clients, pki, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    up = await upstreams(implicit_tls=pki.server_context())
    assert up.url.startswith("smtps://")
    data = message(b"implicit TLS\r\n")
    result = await send(clients(up.url), data)
    assert result.status == "sent", result
    assert len(up.received) == 1
    assert up.received[0].tls
    assert up.received[0].data == data


async def test_implicit_tls_with_untrusted_certificate_defers_and_sends_nothing(upstreams, clients, pki,
                                                                               monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.other_ca))
    up = await upstreams(implicit_tls=pki.server_context())
    result = await send(clients(up.url), message())
    assert result.status == "deferred", result
    assert up.received == []
    assert up.handler.mails == []


# ---------------------------------------------------------------------------------------------------
# 5. AUTH


async def test_auth_with_right_credentials_delivers_with_plain_or_login(upstreams, clients):
    up = await upstreams(auth=True)
    data = message(b"authenticated\r\n")
    result = await send(clients(up.url, username=USER, password=PASSWORD), data)
    assert result.status == "sent", result
    assert [g.data for g in up.received] == [data]
    assert len(up.handler.mechanisms_used) == 1
    assert up.handler.mechanisms_used[0] in {"PLAIN", "LOGIN"}, up.handler.mechanisms_used


async def test_auth_with_wrong_password_is_not_sent_and_nothing_delivered(upstreams, clients):
    up = await upstreams(auth=True)
    result = await send(clients(up.url, username=USER, password="wrong"), message())
    assert result.status in {"deferred", "bounced"}, result
    assert "535" in result.reply, result  # the server's own answer, for the log and the DSN
    assert up.handler.failed_logins >= 1
    assert up.received == []
    assert up.handler.mails == []


async def test_auth_offered_only_after_starttls_delivers_over_tls(upstreams, clients, pki, monkeypatch):
    # The usual smarthost: AUTH appears in the EHLO reply only after STARTTLS.
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    up = await upstreams(auth=True, starttls=pki.server_context())
    data = message(b"authenticated over TLS\r\n")
    result = await send(clients(up.url, starttls=True, username=USER, password=PASSWORD), data)
    assert result.status == "sent", result
    assert [g.data for g in up.received] == [data]
    assert up.received[0].tls
    assert len(up.handler.mechanisms_used) == 1


async def test_auth_required_but_no_credentials_configured_is_not_sent(upstreams, clients):
    up = await upstreams(auth=True)
    result = await send(clients(up.url), message())
    assert result.status in {"deferred", "bounced"}, result
    assert up.received == []


# ---------------------------------------------------------------------------------------------------
# 6. HELO fallback


async def test_upstream_refusing_ehlo_but_accepting_helo_delivers(upstreams, clients):
    up = await upstreams(smtp_class=NoEhloSMTP)
    data = message(b"old server\r\n")
    result = await send(clients(up.url), data)
    assert result.status == "sent", result
    assert [g.data for g in up.received] == [data]
    assert up.received[0].mail_options == []  # no ESMTP parameters to a HELO server


# ---------------------------------------------------------------------------------------------------
# 7. Refusals


async def test_mail_from_550_bounces_with_the_reply_text(upstreams, clients):
    up = await upstreams(Recorder(mail_reply="550 5.7.1 Sender address rejected by policy"))
    result = await send(clients(up.url), message())
    assert result.status == "bounced", result
    assert "550" in result.reply and "Sender address rejected by policy" in result.reply, result
    assert up.received == []


async def test_rcpt_450_defers_with_the_reply_text(upstreams, clients):
    up = await upstreams(Recorder(rcpt_replies={TO: "450 4.2.1 Mailbox busy, try later"}))
    result = await send(clients(up.url), message())
    assert result.status == "deferred", result
    assert "450" in result.reply and "Mailbox busy" in result.reply, result
    assert up.received == []


async def test_rcpt_550_bounces_with_the_reply_text(upstreams, clients):
    up = await upstreams(Recorder(rcpt_replies={TO: "550 5.1.1 No such user here"}))
    result = await send(clients(up.url), message())
    assert result.status == "bounced", result
    assert "550" in result.reply and "No such user here" in result.reply, result
    assert up.received == []


async def test_data_end_554_bounces_with_the_reply_text(upstreams, clients):
    up = await upstreams(Recorder(data_replies=["554 5.7.1 Message content rejected"]))
    result = await send(clients(up.url), message())
    assert result.status == "bounced", result
    assert "554" in result.reply and "Message content rejected" in result.reply, result
    assert up.received == []


async def test_data_end_451_defers_with_the_reply_text(upstreams, clients):
    up = await upstreams(Recorder(data_replies=["451 4.3.0 Local error in processing"]))
    result = await send(clients(up.url), message())
    assert result.status == "deferred", result
    assert "451" in result.reply and "Local error" in result.reply, result
    assert up.received == []


async def test_after_refused_rcpt_next_send_is_delivered_on_the_same_connection(upstreams, clients):
    bad = "nobody@ext.test"
    up = await upstreams(Recorder(rcpt_replies={bad: "550 5.1.1 No such user"}))
    client = clients(up.url)
    first = await send(client, message(b"to nobody\r\n"), rcpt=bad)
    assert first.status == "bounced", first
    data = message(b"to carol\r\n")
    second = await send(client, data)
    assert second.status == "sent", second
    assert [(g.mail_from, g.rcpt_tos, g.data) for g in up.received] == [(FROM, [TO], data)]
    assert up.connections == 1


async def test_after_refused_mail_from_next_send_is_delivered_on_the_same_connection(upstreams, clients):
    handler = Recorder(mail_reply="451 4.3.2 Please try again")
    up = await upstreams(handler)
    client = clients(up.url)
    first = await send(client, message(b"one\r\n"))
    assert first.status == "deferred", first
    handler.mail_reply = None
    data = message(b"two\r\n")
    second = await send(client, data)
    assert second.status == "sent", second
    assert [g.data for g in up.received] == [data]
    assert up.connections == 1


async def test_after_refused_data_next_send_is_delivered_on_the_same_connection(upstreams, clients):
    up = await upstreams(Recorder(data_replies=["554 5.7.1 Spam"]))
    client = clients(up.url)
    first = await send(client, message(b"spammy\r\n"))
    assert first.status == "bounced", first
    data = message(b"clean\r\n")
    second = await send(client, data)
    assert second.status == "sent", second
    assert [g.data for g in up.received] == [data]
    assert up.connections == 1


async def test_rcpt_421_defers_and_next_send_opens_a_new_connection(upstreams, clients):
    # The server keeps the connection open after its 421: the client itself must not reuse it.
    handler = Recorder(rcpt_replies={TO: "421 4.7.0 Service shutting down, closing channel"})
    up = await upstreams(handler)
    client = clients(up.url)
    first = await send(client, message(b"one\r\n"))
    assert first.status == "deferred", first
    assert "421" in first.reply, first
    handler.rcpt_replies.clear()
    data = message(b"two\r\n")
    second = await send(client, data)
    assert second.status == "sent", second
    assert [g.data for g in up.received] == [data]
    assert up.connections == 2


# ---------------------------------------------------------------------------------------------------
# 8. A pooled connection the upstream closed


@pytest.mark.parametrize("settle", [0.0, 0.2], ids=["closed-just-before-the-send", "closed-while-idle"])
async def test_pooled_connection_closed_by_upstream_next_send_still_delivers(upstreams, clients, settle):
    up = await upstreams()
    client = clients(up.url)
    one = message(b"one\r\n")
    assert (await send(client, one)).status == "sent"
    up.drop_connections()
    if settle:
        await asyncio.sleep(settle)
    two = message(b"two\r\n")
    result = await send(client, two)
    assert result.status == "sent", result
    assert [g.data for g in up.received] == [one, two]  # each exactly once
    assert up.connections == 2


# ---------------------------------------------------------------------------------------------------
# 9. An upstream that never answers


@pytest.fixture
async def silent_server():
    """Accepts connections and never sends a byte. Yields its smtp:// URL."""
    writers: list[asyncio.StreamWriter] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()  # until the client goes away; never a greeting

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    yield f"smtp://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    for w in writers:
        w.close()
    await server.wait_closed()


async def test_upstream_that_never_answers_defers_after_the_timeout(silent_server, clients):
    client = clients(silent_server, timeout_seconds=0.5)
    result = await send(client, message())  # HANG bounds it generously, to catch a hang
    assert result.status == "deferred", result


async def test_unreachable_upstream_defers(upstreams, clients):
    up = await upstreams()
    url = up.url
    await up.stop()
    result = await send(clients(url), message())
    assert result.status == "deferred", result


# ---------------------------------------------------------------------------------------------------
# 10. Internationalised addresses


async def test_non_ascii_recipient_delivered_with_smtputf8_when_advertised(upstreams, clients):
    up = await upstreams(smtputf8=True)
    rcpt = "jürgen@bücher.test"
    data = message("Grüße\r\n".encode())
    result = await send(clients(up.url), data, rcpt=rcpt)
    assert result.status == "sent", result
    assert len(up.received) == 1
    assert up.received[0].rcpt_tos == [rcpt]
    assert "SMTPUTF8" in up.received[0].mail_options
    assert up.received[0].data == data


async def test_ascii_addresses_sent_without_smtputf8_even_when_advertised(upstreams, clients):
    up = await upstreams(smtputf8=True)
    result = await send(clients(up.url), message())
    assert result.status == "sent", result
    assert "SMTPUTF8" not in up.received[0].mail_options


async def test_non_ascii_recipient_bounces_553_5_6_7_without_smtputf8(upstreams, clients):
    up = await upstreams(smtputf8=False)
    result = await send(clients(up.url), message(), rcpt="jürgen@bücher.test")
    assert result.status == "bounced", result
    assert result.reply.startswith("553 5.6.7"), result
    assert up.received == []


# ---------------------------------------------------------------------------------------------------
# 11. Multi-line (continuation) replies


async def test_multiline_ehlo_reply_is_read_whole(upstreams, clients):
    # SIZE in the middle of the EHLO reply, SMTPUTF8 on its last line: both must be seen.
    up = await upstreams(ReorderedEhlo(), size=40000, smtputf8=True)
    client = clients(up.url)
    rcpt = "jürgen@bücher.test"
    data = message(b"multi-line EHLO\r\n")
    result = await send(client, data, rcpt=rcpt)
    assert result.status == "sent", result
    opts = up.received[0].mail_options
    assert "SMTPUTF8" in opts and any(o.startswith("SIZE=") for o in opts), opts
    data2 = message(b"again\r\n")
    assert (await send(client, data2)).status == "sent"
    assert [g.data for g in up.received] == [data, data2]
    assert up.connections == 1
    assert await asyncio.wait_for(clients(up.url).advertised_size(), HANG) == 40000


async def test_multiline_data_end_reply_is_read_whole(upstreams, clients):
    handler = Recorder(data_replies=["250-2.0.0 Ok: the first line\r\n250-2.0.0 a middle line\r\n"
                                     "250 2.0.0 queued as ABC123"])
    up = await upstreams(handler)
    client = clients(up.url)
    first = await send(client, message(b"one\r\n"))
    assert first.status == "sent", first
    assert "first line" in first.reply and "queued as ABC123" in first.reply, first
    # the rest of that reply must not be taken as the answer to the next transaction's commands
    handler.rcpt_replies["nobody@ext.test"] = "550 5.1.1 No such user"
    refused = await send(client, message(b"two\r\n"), rcpt="nobody@ext.test")
    assert refused.status == "bounced", refused
    data = message(b"three\r\n")
    third = await send(client, data)
    assert third.status == "sent", third
    assert [g.data for g in up.received] == [data]  # the first went through the multi-line 250
    assert up.connections == 1


async def test_multiline_rcpt_refusal_is_read_whole_and_the_connection_reused(upstreams, clients):
    up = await upstreams(Recorder(rcpt_replies={"nobody@ext.test": "550-5.1.1 The mailbox does not exist\r\n"
                                                                   "550-5.1.1 Please check the address\r\n"
                                                                   "550 5.1.1 and try again"}))
    client = clients(up.url)
    first = await send(client, message(b"one\r\n"), rcpt="nobody@ext.test")
    assert first.status == "bounced", first
    assert "does not exist" in first.reply and "try again" in first.reply, first
    data = message(b"two\r\n")
    second = await send(client, data)
    assert second.status == "sent", second
    assert [g.data for g in up.received] == [data]
    assert up.connections == 1


# ---------------------------------------------------------------------------------------------------
# 12. Many sends over one pooled connection


async def test_fifty_sends_in_a_row_over_one_connection_arrive_in_order_once_each(upstreams, clients):
    up = await upstreams(size=1_000_000)
    client = clients(up.url, max_connections=1)
    sent = []
    for i in range(50):
        data = message(f"message number {i}\r\n.{i} dotted\r\n".encode(), subject=f"n{i}")
        result = await send(client, data, rcpt=f"r{i}@ext.test")
        assert result.status == "sent", (i, result)
        sent.append((f"r{i}@ext.test", data))
    assert [(g.rcpt_tos[0], g.data) for g in up.received] == sent
    assert all(len(g.rcpt_tos) == 1 for g in up.received)
    assert up.connections == 1


async def test_concurrent_sends_stay_within_max_connections_and_arrive_once_each(upstreams, clients):
    up = await upstreams()
    client = clients(up.url, max_connections=2)
    datas = [message(f"concurrent {i}\r\n".encode(), subject=f"c{i}") for i in range(20)]
    results = await asyncio.wait_for(
        asyncio.gather(*(client.send(FROM, f"c{i}@ext.test", d) for i, d in enumerate(datas))), HANG)
    assert [r.status for r in results] == ["sent"] * 20, results
    assert sorted(g.data for g in up.received) == sorted(datas)
    assert sorted(g.rcpt_tos[0] for g in up.received) == sorted(f"c{i}@ext.test" for i in range(20))
    for g in up.received:  # each message went with its own recipient
        i = int(g.rcpt_tos[0][1:].split("@")[0])
        assert g.data == datas[i]
    assert up.connections <= 2


async def test_close_quits_pooled_connections(upstreams, clients):
    up = await upstreams()
    client = clients(up.url)
    assert (await send(client, message())).status == "sent"
    await asyncio.wait_for(client.close(), HANG)
    await wait_until(lambda: all(p.transport is None for p in up.protocols), timeout=HANG,
                     what="the pooled connection closed after close()")
