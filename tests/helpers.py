"""Test parts: a real aiosmtpd upstream that records what it gets and can be told to fail, and a
running trackrelay (in-process or as a subprocess) pointed at it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
from aiosmtpd.smtp import SMTP

from core import config as config_mod
from core.passwords import hash_password, token_hash

PASSWORD = "s3cret-pw"
PASSWORD_HASH = hash_password(PASSWORD)
API_TOKENS = {name: f"trk_test_token_for_{name}_0123456789" for name in ("alice", "bob", "carl")}


async def wait_until(predicate, timeout: float = 20.0, what: str = "") -> None:
    """Poll ``predicate`` every 20 ms until it is true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class SinkBehaviour:
    #: address -> reply for RCPT (e.g. "550 5.1.1 No such user", "451 4.3.0 Try later")
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    #: replies for the next DATA commands, in order (then 250)
    data_replies: deque = field(default_factory=deque)
    #: drop the connection after the final dot this many times (no reply)
    drop_after_dot: int = 0
    size: int | None = None
    #: seconds to wait after the final dot before answering (a slow upstream)
    data_delay: float = 0.0
    #: offer SMTPUTF8 (internationalised addresses)
    smtputf8: bool = True
    #: offer PIPELINING (RFC 2920), as real smarthosts do (aiosmtpd reads pipelined commands in order)
    pipelining: bool = True
    #: the longest line taken, CRLF included (aiosmtpd's default: RFC 5321's 1,001; Postfix takes more)
    line_length_limit: int = 1001


class SinkHandler:
    def __init__(self, behaviour: SinkBehaviour):
        self.b = behaviour
        self.received: list[Received] = []
        self.connections = 0
        self.arrived = asyncio.Event()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.b.pipelining:
            responses = responses[:-1] + ["250-PIPELINING", responses[-1]]
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.b.rcpt_replies.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.b.data_delay:
            await asyncio.sleep(self.b.data_delay)
        if self.b.drop_after_dot > 0:
            self.b.drop_after_dot -= 1
            server.transport.close()
            return "250 2.0.0 never seen"  # the client never reads it: the transport is closed
        if self.b.data_replies:
            return self.b.data_replies.popleft()
        self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        self.arrived.set()
        return "250 2.0.0 OK"


class Sink:
    """A real SMTP server on loopback: the upstream smarthost of the tests."""

    def __init__(self):
        self.behaviour = SinkBehaviour()
        self.handler = SinkHandler(self.behaviour)
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._protocols: list[SMTP] = []

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> "Sink":
        handler = self.handler
        behaviour = self.behaviour

        def factory():
            handler.connections += 1
            # aiosmtpd sizes its stream reader by the class's line_length_limit
            cls = type("SinkSMTP", (SMTP,), {"line_length_limit": behaviour.line_length_limit})
            proto = cls(handler, hostname="sink.test", data_size_limit=behaviour.size,
                        enable_SMTPUTF8=behaviour.smtputf8)
            self._protocols.append(proto)
            return proto

        self._server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            self._server = None
        for proto in self._protocols:
            if proto.transport is not None:
                proto.transport.close()
        self._protocols.clear()
        await asyncio.sleep(0)

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"upstream got {len(self.received)} messages, expected {count}")
            await asyncio.sleep(0.02)
        return self.received


def base_config(*, db_url: str, relay_port: int, upstream_url: str, tmp: Path, **sections) -> dict:
    tracker_port = free_port()
    cfg = {
        "relay": {"listen": f"127.0.0.1:{relay_port}", "hostname": "relay.example.test"},
        "upstream": {"url": upstream_url, "starttls": False, "timeout_seconds": 5},
        "queue": {"retry_initial_seconds": 0.2, "retry_max_seconds": 1, "lease_seconds": 30},
        "storage": {"url": db_url},
        "tracker": {"listen": f"127.0.0.1:{tracker_port}", "public_url": f"http://127.0.0.1:{tracker_port}",
                    "secret_keys": ["test-key-0123456789abcdef"]},
        "api": {"listen": f"127.0.0.1:{free_port()}"},
        "log": {"level": "warning"},
        "users": [
            {"name": "alice", "password_hash": PASSWORD_HASH, "addresses": ["alice@example.com"],
             "api_token_hash": token_hash(API_TOKENS["alice"])},
            {"name": "bob", "password_hash": PASSWORD_HASH, "addresses": ["bob@example.com"], "admin": True,
             "api_token_hash": token_hash(API_TOKENS["bob"])},
            {"name": "carl", "password_hash": PASSWORD_HASH, "addresses": ["carl@example.com"],
             "api_token_hash": token_hash(API_TOKENS["carl"])},
        ],
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def make_config(data: dict, source: str = "test.toml") -> config_mod.Config:
    return config_mod.from_dict(data, source, env={})


def to_toml(data: dict) -> str:
    """Enough TOML for our config dicts (tables, arrays of tables, scalars, lists of strings)."""
    import json

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        raise TypeError(v)

    out = []
    for key, value in data.items():
        if isinstance(value, dict):
            out.append(f"[{key}]")
            out += [f"{k} = {val(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                out.append(f"[[{key}]]")
                out += [f"{k} = {val(v)}" for k, v in item.items()]
        out.append("")
    return "\n".join(out)


async def client(port: int, user: str | None = "alice", password: str = PASSWORD,
                 source: str | None = None) -> aiosmtplib.SMTP:
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, local_hostname="client.test",
                        timeout=10, source_address=(source, 0) if source else None)
    await c.connect()
    await c.ehlo()
    if user:
        await c.login(user, password)
    return c


def simple_message(*, frm: str = "alice@example.com", to: str = "carol@ext.test", subject: str = "Hello",
                   extra: str = "", body: str = "Hi there.\r\n") -> bytes:
    return (f"From: Alice <{frm}>\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}"
            f"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n\r\n{body}").encode()


class RelayProcess:
    """`trackrelay serve` as a subprocess (for SIGKILL and SIGTERM tests)."""

    def __init__(self, config_path: Path, port: int, log_path: Path):
        self.config_path, self.port, self.log_path = config_path, port, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RelayProcess":
        env = dict(os.environ)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "trackrelay.cli", "-c", str(self.config_path), "serve"],
                                     stdout=self._log, stderr=self._log, env=env, stdin=subprocess.DEVNULL)
        return self

    async def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"trackrelay exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                r, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise AssertionError("trackrelay did not start listening")

    def kill(self, sig: int) -> int | None:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(20)
        finally:
            self._log.close()
