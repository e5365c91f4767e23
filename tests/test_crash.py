"""No loss across SIGKILL, and a clean drain on SIGTERM: `trackrelay serve` as a real subprocess."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import pytest

from helpers import RelayProcess, base_config, client, free_port, simple_message, to_toml

pytestmark = pytest.mark.slow


def write_config(tmp_path, db_url, relay_port, sink_port):
    cfg = base_config(db_url=db_url, relay_port=relay_port, upstream_url=f"smtp://127.0.0.1:{sink_port}",
                      tmp=tmp_path, queue={"retry_initial_seconds": 0.2, "retry_max_seconds": 0.5,
                                           "lease_seconds": 5})
    path = tmp_path / "trackrelay.toml"
    path.write_text(to_toml(cfg))
    return path


async def test_sigkill_after_250_with_upstream_down_loses_nothing(tmp_path, db_url, sink):
    sink_port = sink.port
    await sink.stop()  # the upstream is down while mail is accepted
    relay_port = free_port()
    path = write_config(tmp_path, db_url, relay_port, sink_port)
    proc = RelayProcess(path, relay_port, tmp_path / "relay.log").start()
    await proc.wait_listening()
    accepted = []
    c = await client(relay_port)
    for i in range(20):
        mid = f"<crash-{i}@example.com>"
        await c.sendmail("alice@example.com", [f"r{i}a@ext.test", f"r{i}b@ext.test"],
                         simple_message(extra=f"Message-ID: {mid}\r\n"))
        accepted.append(mid)
    c.close()
    assert proc.kill(signal.SIGKILL) == -signal.SIGKILL  # right after the last 250

    await sink.start(sink_port)  # the upstream is back
    proc = RelayProcess(path, relay_port, tmp_path / "relay.log").start()
    await proc.wait_listening()
    got = await sink.wait_for(40, timeout=30)
    assert proc.kill(signal.SIGTERM) == 0
    delivered = Counter()
    for r in got:
        mid = [line for line in r.data.split(b"\r\n") if line.startswith(b"Message-ID:")][0].split()[1].decode()
        delivered[(mid, r.rcpt_tos[0])] += 1
    wanted = {(mid, f"r{i}{s}@ext.test") for i, mid in enumerate(accepted) for s in "ab"}
    assert set(delivered) == wanted


async def test_sigkill_during_delivery_delivers_everything_at_least_once_and_counts_duplicates(tmp_path, db_url, sink):
    relay_port = free_port()
    path = write_config(tmp_path, db_url, relay_port, sink.port)
    proc = RelayProcess(path, relay_port, tmp_path / "relay.log").start()
    await proc.wait_listening()
    c = await client(relay_port)
    n = 30
    for i in range(n):
        await c.sendmail("alice@example.com", [f"r{i}@ext.test"],
                         simple_message(extra=f"Message-ID: <during-{i}@example.com>\r\n"))
    c.close()
    # Kill it while copies are going out.
    while len(sink.received) < 3:
        await asyncio.sleep(0.005)
    proc.kill(signal.SIGKILL)
    proc = RelayProcess(path, relay_port, tmp_path / "relay.log").start()
    await proc.wait_listening()
    await sink.wait_for(n, timeout=30)
    await asyncio.sleep(6)  # any lapsed lease is reclaimed by now
    assert proc.kill(signal.SIGTERM) == 0
    per_rcpt = Counter(r.rcpt_tos[0] for r in sink.received)
    assert set(per_rcpt) == {f"r{i}@ext.test" for i in range(n)}
    duplicates = sum(v - 1 for v in per_rcpt.values())

    from sqlalchemy import text

    from storage.engine import make_engine
    engine = make_engine(db_url)
    async with engine.connect() as conn:
        reclaims = (await conn.execute(text("SELECT coalesce(sum(reclaims), 0) FROM recipients"))).scalar()
        unsent = (await conn.execute(text("SELECT count(*) FROM recipients WHERE status <> 'sent'"))).scalar()
    await engine.dispose()
    assert unsent == 0
    # Every duplicate is explained by a reclaimed lease (a claim whose delivery was never recorded).
    assert duplicates <= reclaims


async def test_sigterm_drains_and_exits_cleanly(tmp_path, db_url, sink):
    relay_port = free_port()
    path = write_config(tmp_path, db_url, relay_port, sink.port)
    proc = RelayProcess(path, relay_port, tmp_path / "relay.log").start()
    await proc.wait_listening()
    c = await client(relay_port)
    await c.sendmail("alice@example.com", ["carol@ext.test"], simple_message())
    await c.quit()
    await sink.wait_for(1)
    assert proc.kill(signal.SIGTERM) == 0
    assert "Traceback" not in (tmp_path / "relay.log").read_text()
