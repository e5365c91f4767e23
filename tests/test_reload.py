"""SIGHUP to a running `trackrelay serve`: the config file is read again without a restart; one
that no longer validates is refused and the running configuration kept."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import signal
import ssl
import subprocess

import aiosmtplib
import pytest

from helpers import PASSWORD, PASSWORD_HASH, RelayProcess, base_config, client, free_port, simple_message, to_toml, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def db_url(tmp_path):  # one process: SQLite is what a single serve runs on
    return f"sqlite+aiosqlite:///{tmp_path}/trackrelay.db"


async def _can_auth(port: int, user: str) -> bool:
    try:
        c = await client(port, user=user)
    except aiosmtplib.SMTPAuthenticationError:
        return False
    await c.quit()
    return True


async def test_sighup_adds_and_removes_users_and_refuses_an_invalid_config(tmp_path, db_url, sink):
    relay_port = free_port()
    cfg = base_config(db_url=db_url, relay_port=relay_port, upstream_url=sink.url, tmp=tmp_path,
                      log={"level": "info"})
    path = tmp_path / "trackrelay.toml"
    path.write_text(to_toml(cfg))
    log_path = tmp_path / "relay.log"
    proc = RelayProcess(path, relay_port, log_path).start()
    try:
        await proc.wait_listening()
        assert not await _can_auth(relay_port, "dave")

        cfg["users"] = [u for u in cfg["users"] if u["name"] != "carl"] + [
            {"name": "dave", "password_hash": PASSWORD_HASH, "addresses": ["dave@example.com"]}]
        path.write_text(to_toml(cfg))
        proc.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: "SIGHUP: reloaded" in log_path.read_text(), 15, "the reload")
        assert await _can_auth(relay_port, "dave")  # added: signs in without a restart
        assert not await _can_auth(relay_port, "carl")  # removed
        c = await client(relay_port, user="dave")
        await c.sendmail("dave@example.com", ["erin@ext.test"], simple_message(frm="dave@example.com"))
        await c.quit()
        await sink.wait_for(1)

        path.write_text(to_toml(cfg).replace('max_recipients', 'max_recipientz') + "\n[relay]\nmax_recipients = 0\n")
        proc.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: "reload refused" in log_path.read_text(), 15, "the refusal")
        assert await _can_auth(relay_port, "dave")  # the running configuration stays
        assert await _can_auth(relay_port, "alice")
        assert proc.proc.poll() is None
    finally:
        rc = proc.kill(signal.SIGTERM)
    assert rc == 0


async def test_sighup_names_what_needs_a_restart(tmp_path, db_url, sink):
    relay_port = free_port()
    cfg = base_config(db_url=db_url, relay_port=relay_port, upstream_url=sink.url, tmp=tmp_path,
                      log={"level": "info"})
    path = tmp_path / "trackrelay.toml"
    path.write_text(to_toml(cfg))
    log_path = tmp_path / "relay.log"
    proc = RelayProcess(path, relay_port, log_path).start()
    try:
        await proc.wait_listening()
        cfg["api"]["listen"] = f"127.0.0.1:{free_port()}"
        path.write_text(to_toml(cfg))
        proc.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: "need a restart: api.listen" in log_path.read_text(), 15, "the restart note")
        await asyncio.sleep(0.1)
        assert await _can_auth(relay_port, "alice")
    finally:
        assert proc.kill(signal.SIGTERM) == 0


# --- TLS certificates: a SIGHUP loads renewed files; sessions already in TLS keep theirs ---------

def _make_cert(directory, cn: str) -> tuple[bytes, bytes]:
    """A self-signed certificate and its key (PEM), made with openssl in ``directory``."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = directory / f"{cn}.crt", directory / f"{cn}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", f"/CN={cn}"], check=True, capture_output=True)
    return cert.read_bytes(), key.read_bytes()


def _fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _pem_fingerprint(pem: bytes) -> str:
    return _fingerprint(ssl.PEM_cert_to_DER_cert(pem.decode()))


def _peer_fingerprint(transport: asyncio.BaseTransport) -> str:
    return _fingerprint(transport.get_extra_info("ssl_object").getpeercert(binary_form=True))


async def _starttls(port: int) -> tuple[aiosmtplib.SMTP, str]:
    """A session in TLS (STARTTLS) signed in as alice, and the fingerprint of what the relay presented."""
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, local_hostname="client.test", timeout=10)
    await c.connect()
    await c.ehlo()
    await c.starttls(validate_certs=False)
    await c.ehlo()
    await c.login("alice", PASSWORD)
    return c, _peer_fingerprint(c.transport)


def _insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _https(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=_insecure()), 10)
    return r, w, _peer_fingerprint(w.transport)


async def _healthz(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bytes:
    """GET /healthz on a kept-alive https connection: the status line."""
    w.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await w.drain()
    status = await asyncio.wait_for(r.readline(), 10)
    length = 0
    while (line := await asyncio.wait_for(r.readline(), 10)) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await r.readexactly(length)
    return status


def _count(log_path, text: str) -> int:
    return log_path.read_text().count(text)


async def _hup(proc: RelayProcess, log_path, text: str) -> None:
    """SIGHUP, then wait for one more ``text`` line in the log."""
    before = _count(log_path, text)
    proc.proc.send_signal(signal.SIGHUP)
    await wait_until(lambda: _count(log_path, text) > before, 15, text)


def _tls_setup(tmp_path, db_url, sink):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    first, second = _make_cert(one, "first.example.test"), _make_cert(two, "second.example.test")
    files = {name: (tmp_path / f"{name}.crt", tmp_path / f"{name}.key") for name in ("relay", "api")}
    for cert, key in files.values():
        cert.write_bytes(first[0]), key.write_bytes(first[1])
    relay_port, api_port = free_port(), free_port()
    cfg = base_config(db_url=db_url, relay_port=relay_port, upstream_url=sink.url, tmp=tmp_path,
                      log={"level": "info"},
                      relay={"tls_cert_file": str(files["relay"][0]), "tls_key_file": str(files["relay"][1])},
                      api={"listen": f"127.0.0.1:{api_port}", "tls_cert_file": str(files["api"][0]),
                           "tls_key_file": str(files["api"][1])})
    path = tmp_path / "trackrelay.toml"
    path.write_text(to_toml(cfg))
    log_path = tmp_path / "relay.log"
    return cfg, path, log_path, files, first, second, relay_port, api_port


async def test_sighup_loads_renewed_certificates_and_keeps_the_sessions_in_tls(tmp_path, db_url, sink):
    cfg, path, log_path, files, first, second, relay_port, api_port = _tls_setup(tmp_path, db_url, sink)
    proc = RelayProcess(path, relay_port, log_path).start()
    try:
        await proc.wait_listening()
        old, seen = await _starttls(relay_port)
        assert seen == _pem_fingerprint(first[0])
        r, w, api_seen = await _https(api_port)
        assert api_seen == _pem_fingerprint(first[0])
        assert b" 200 " in await _healthz(r, w)

        for cert, key in files.values():  # renewed in place, as certbot's deploy hook would
            cert.write_bytes(second[0]), key.write_bytes(second[1])
        await _hup(proc, log_path, "SIGHUP: reloaded")
        assert "reload failed" not in log_path.read_text()

        new, seen = await _starttls(relay_port)  # a new handshake: the renewed certificate
        assert seen == _pem_fingerprint(second[0])
        await new.sendmail("alice@example.com", ["erin@ext.test"], simple_message(to="erin@ext.test"))
        await new.quit()
        _, w2, api_seen = await _https(api_port)
        assert api_seen == _pem_fingerprint(second[0])
        w2.close()

        # the sessions opened before the reload were not dropped and still work
        code, _ = await old.noop()
        assert code == 250
        await old.sendmail("alice@example.com", ["carol@ext.test"], simple_message())
        await old.quit()
        assert b" 200 " in await _healthz(r, w)
        w.close()
        await sink.wait_for(2)
    finally:
        assert proc.kill(signal.SIGTERM) == 0


@pytest.mark.parametrize("broken", ["relay certificate", "relay key", "relay mismatch", "api certificate", "api key"])
async def test_sighup_refuses_a_certificate_that_does_not_load_and_keeps_the_old_one(tmp_path, db_url, sink, broken):
    cfg, path, log_path, files, first, second, relay_port, api_port = _tls_setup(tmp_path, db_url, sink)
    proc = RelayProcess(path, relay_port, log_path).start()
    try:
        await proc.wait_listening()
        old, seen = await _starttls(relay_port)
        assert seen == _pem_fingerprint(first[0])

        # a renewal gone wrong: one file of the pair garbage (the other already the new one) or the
        # new certificate beside the old key, and
        # in the same edit a user added: nothing of this file is taken, not half of it
        listener, part = broken.split()
        for name, (cert, key) in files.items():
            cert.write_bytes(second[0]), key.write_bytes(second[1])
            if name == listener and part == "mismatch":  # the new certificate, the old key
                key.write_bytes(first[1])
            elif name == listener:
                (cert if part == "certificate" else key).write_bytes(b"-----BEGIN garbage-----\nnot PEM\n")
        cfg["users"] = cfg["users"] + [
            {"name": "dave", "password_hash": PASSWORD_HASH, "addresses": ["dave@example.com"]}]
        path.write_text(to_toml(cfg))
        await _hup(proc, log_path, "keeping the running configuration")
        text = log_path.read_text()
        assert "SIGHUP: reloaded" not in text
        line = next(l for l in text.splitlines() if "keeping the running configuration" in l)
        assert "SIGHUP: reload" in line, line
        # the reason: which file of which listener, and what is wrong with it
        wrong = files[listener][0 if part == "certificate" else 1]
        assert f"{listener}.tls_{'cert' if part == 'certificate' else 'key'}_file" in line, line
        assert str(wrong) in line and "PEM" in line, line

        # the old certificate is still served, on both listeners, and new handshakes succeed
        new, seen = await _starttls(relay_port)
        assert seen == _pem_fingerprint(first[0])
        await new.quit()
        r, w, api_seen = await _https(api_port)
        assert api_seen == _pem_fingerprint(first[0])
        assert b" 200 " in await _healthz(r, w)
        w.close()
        assert not await _can_auth_tls(relay_port, "dave")  # the running configuration kept whole
        code, _ = await old.noop()
        assert code == 250
        await old.quit()
        assert proc.proc.poll() is None
    finally:
        assert proc.kill(signal.SIGTERM) == 0


async def _can_auth_tls(port: int, user: str) -> bool:
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, local_hostname="client.test", timeout=10)
    await c.connect()
    await c.ehlo()
    await c.starttls(validate_certs=False)
    await c.ehlo()
    try:
        await c.login(user, PASSWORD)
    except aiosmtplib.SMTPAuthenticationError:
        return False
    finally:
        c.close()
    return True
