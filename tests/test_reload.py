"""SIGHUP to a running `trackrelay serve`: the config file is read again without a restart; one
that no longer validates is refused and the running configuration kept."""

from __future__ import annotations

import asyncio
import signal

import aiosmtplib
import pytest

from helpers import PASSWORD_HASH, RelayProcess, base_config, client, free_port, simple_message, to_toml, wait_until

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
