"""No loss across SIGKILL, and a clean drain on SIGTERM: `trackrelay serve` as a real subprocess."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import pytest

from helpers import RelayProcess, base_config, client, free_port, simple_message, to_toml, wait_until

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


# -- crash recovery: claims belong to a live process ----------------------------------------------

@pytest.fixture
def reaper():
    """Processes a test started: whatever still runs when it ends (a failed assertion) is killed."""
    started: list[RelayProcess] = []
    yield started
    for p in started:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)

def write_default_queue_config(tmp_path, db_url, relay_port, sink_port, **sections):
    """Every queue setting at its default (lease_seconds 300, retries from 60 s)."""
    cfg = base_config(db_url=db_url, relay_port=relay_port, upstream_url=f"smtp://127.0.0.1:{sink_port}",
                      tmp=tmp_path, **sections)
    del cfg["queue"]
    path = tmp_path / "trackrelay.toml"
    path.write_text(to_toml(cfg))
    return path


async def scalar(db_url: str, sql: str, **params):
    from sqlalchemy import text

    from storage.engine import make_engine
    engine = make_engine(db_url)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(text(sql), params)).scalar()
    finally:
        await engine.dispose()


def copies_by_message_id(received) -> Counter:
    out = Counter()
    for r in received:
        mid = [line for line in r.data.split(b"\r\n") if line.startswith(b"Message-ID:")][0].split()[1].decode()
        out[(mid, r.rcpt_tos[0])] += 1
    return out


async def test_sigkill_with_copies_in_flight_then_restart_delivers_every_copy_within_10_s(tmp_path, db_url, sink,
                                                                                          reaper):
    """kill -9 right after the 250s, with transfers under way and more copies handed over: after a
    restart with the default lease (300 s) nothing waits for it to lapse."""
    sink.behaviour.data_delay = 3.0  # every lane is in a transfer when the process dies
    relay_port = free_port()
    path = write_default_queue_config(tmp_path, db_url, relay_port, sink.port)
    proc = RelayProcess(path, relay_port, tmp_path / "relay.log").start()
    reaper.append(proc)
    await proc.wait_listening()
    c = await client(relay_port)
    wanted = set()
    for i in range(10):
        mid = f"<inflight-{i}@example.com>"
        await c.sendmail("alice@example.com", [f"r{i}a@ext.test", f"r{i}b@ext.test"],
                         simple_message(extra=f"Message-ID: {mid}\r\n"))
        wanted |= {(mid, f"r{i}a@ext.test"), (mid, f"r{i}b@ext.test")}
    c.close()
    assert proc.kill(signal.SIGKILL) == -signal.SIGKILL
    assert await scalar(db_url, "SELECT count(*) FROM recipients WHERE status = 'sending'") > 0

    sink.behaviour.data_delay = 0.0
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    proc = RelayProcess(path, relay_port, tmp_path / "relay.log").start()
    reaper.append(proc)
    await wait_until(lambda: set(copies_by_message_id(sink.received)) >= wanted, 10.0,
                     "every copy delivered within 10 s of the restart")
    elapsed = loop.time() - t0
    await proc.wait_listening()
    await wait_until_db(db_url, "SELECT count(*) FROM recipients WHERE status <> 'sent'", 0)
    assert proc.kill(signal.SIGTERM) == 0
    duplicates = sum(n - 1 for n in copies_by_message_id(sink.received).values())
    reclaims = await scalar(db_url, "SELECT coalesce(sum(reclaims), 0) FROM recipients")
    assert duplicates <= reclaims  # each duplicate is a transfer cut by the kill, and counted
    assert elapsed < 10.0


async def wait_until_db(db_url: str, sql: str, want, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (got := await scalar(db_url, sql)) != want:
        if loop.time() > deadline:
            raise AssertionError(f"{sql!r} is {got}, wanted {want}")
        await asyncio.sleep(0.1)


async def lock_database(db_url: str, tmp_path, seconds: float):
    """Hold the database locked from another connection for ``seconds``; returns once it holds.
    SQLite: another process in BEGIN EXCLUSIVE; PostgreSQL: the recipients table locked."""
    if db_url.startswith("sqlite"):
        import sys
        path = db_url.split(":///", 1)[1]
        code = ("import sqlite3, sys, time\n"
                "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
                "c.execute('BEGIN EXCLUSIVE')\n"
                "print('locked', flush=True)\n"
                "time.sleep(float(sys.argv[2]))\n"
                "c.execute('COMMIT')\n")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, path, str(seconds),
                                                    stdout=asyncio.subprocess.PIPE)
        assert (await proc.stdout.readline()).strip() == b"locked"
        return proc.wait()
    import asyncpg
    conn = await asyncpg.connect(db_url.replace("postgresql+asyncpg://", "postgresql://"))
    tx = conn.transaction()
    await tx.start()
    await conn.execute("LOCK TABLE recipients IN ACCESS EXCLUSIVE MODE")

    async def hold():
        await asyncio.sleep(seconds)
        await tx.commit()
        await conn.close()
    return hold()


async def test_database_locked_longer_than_the_lease_while_a_lane_sends_delivers_once(tmp_path, db_url, sink,
                                                                                      reaper):
    """No crash, only a slow database: the copy a lane is sending stays its own, however long the
    lock outlasts the lease (5 s)."""
    sink.behaviour.data_delay = 10.0  # the transfer outlasts the lock, which outlasts the lease
    relay_port = free_port()
    cfg = base_config(db_url=db_url, relay_port=relay_port, upstream_url=sink.url, tmp=tmp_path,
                      queue={"lease_seconds": 5, "retry_initial_seconds": 0.2, "retry_max_seconds": 0.5},
                      upstream={"timeout_seconds": 30}, log={"level": "info"})
    path = tmp_path / "trackrelay.toml"
    path.write_text(to_toml(cfg))
    proc = RelayProcess(path, relay_port, tmp_path / "relay.log").start()
    reaper.append(proc)
    await proc.wait_listening()
    c = await client(relay_port)
    await c.sendmail("alice@example.com", ["carol@ext.test"],
                     simple_message(extra="Message-ID: <locked-1@example.com>\r\n"))
    await c.quit()
    await asyncio.sleep(0.5)  # the lane is in DATA now
    held = await lock_database(db_url, tmp_path, 8.0)
    sink.behaviour.data_delay = 0.0  # the first transfer sleeps on; a second would arrive at once
    await held
    await wait_until_db(db_url, "SELECT count(*) FROM recipients WHERE status = 'sent'", 1, timeout=20)
    await asyncio.sleep(6.0)  # a lapsed lease would have been claimed again by now
    assert [r.rcpt_tos for r in sink.received] == [["carol@ext.test"]]
    assert await scalar(db_url, "SELECT reclaims FROM recipients") == 0
    assert proc.kill(signal.SIGTERM) == 0
    assert "Traceback" not in (tmp_path / "relay.log").read_text()




@pytest.mark.postgres
async def test_two_workers_one_killed_the_survivor_takes_its_copies_within_a_few_heartbeats(tmp_path, sink, pg_url):
    """`serve --only worker` twice beside a relay, the default lease (300 s): kill -9 the worker
    holding copies, and the other frees and delivers them within a few heartbeat intervals."""
    from relay.handoff import HEARTBEAT_SECONDS
    from topology import Topology, send_many

    topo = Topology(pg_url, sink.url, tmp_path)
    topo.build(relays=1, workers=2, trackers=0)
    for p in topo.procs:
        p.config.write_text(p.config.read_text().replace("lease_seconds = 6\n", "lease_seconds = 300\n"))
    sink.behaviour.data_delay = 0.5  # copies stay in transfer (and claimed) for a while
    await topo.start()
    try:
        await wait_until_db(pg_url, "SELECT count(*) FROM worker_heartbeats", 2, timeout=30)
        ids = await send_many([p.ports["relay"] for p in topo.of("relay")], 40, 1, concurrency=4)
        await wait_until_db(pg_url, "SELECT count(*) > 0 FROM recipients WHERE status = 'sending'", True)
        owner = await scalar(pg_url, "SELECT lease_owner FROM recipients WHERE status = 'sending' "
                                     "GROUP BY lease_owner ORDER BY count(*) DESC LIMIT 1")
        (victim,) = [p for p in topo.of("worker") if p.popen.pid == int(owner.split(":")[-2])]
        held = await scalar(pg_url, "SELECT count(*) FROM recipients WHERE status = 'sending' AND lease_owner = :o",
                            o=owner)
        assert held > 0
        loop = asyncio.get_running_loop()
        assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
        killed = loop.time()
        await wait_until_db(pg_url, f"SELECT count(*) FROM recipients WHERE lease_owner = '{owner}'", 0,
                            timeout=4 * HEARTBEAT_SECONDS + 2)
        freed_after = loop.time() - killed
        sink.behaviour.data_delay = 0.0
        await wait_until_db(pg_url, "SELECT count(*) FROM recipients WHERE status <> 'sent'", 0, timeout=60)
        assert await scalar(pg_url, "SELECT count(*) FROM worker_heartbeats WHERE owner = :o", o=owner) == 0
        reclaims = await scalar(pg_url, "SELECT coalesce(sum(reclaims), 0) FROM recipients")
        assert reclaims >= 1
    finally:
        topo.stop()
    per_copy = Counter()
    for r in sink.received:
        mid = [line for line in r.data.split(b"\r\n") if line.startswith(b"Message-ID:")][0].split()[1].decode()
        per_copy[mid] += 1
    assert set(per_copy) == set(ids)  # none lost
    assert sum(n - 1 for n in per_copy.values()) <= reclaims  # each duplicate counted
    assert freed_after <= 4 * HEARTBEAT_SECONDS + 2
    assert topo.logs_clean()


@pytest.mark.postgres
async def test_a_heartbeat_that_stands_still_frees_its_claims_one_that_moves_keeps_them(tmp_path, sink, pg_url):
    """Workers on other machines (no pid to look at): judged by their heartbeats alone. A copy
    claimed by one whose heartbeat stopped is delivered after a few intervals; a copy claimed by
    one whose heartbeat moves stays its own, whatever its lease says, until the heartbeat stops."""
    from datetime import timedelta

    from conftest import RelayFixture
    from relay.handoff import HEARTBEAT_SECONDS, STALE_BEATS
    from storage import queue as q
    from storage.models import utcnow
    from storage.spool import SpoolEntry, SpoolRecipient, add_entries

    relay = RelayFixture(tmp_path, pg_url, sink)
    await relay.start()
    try:
        async with relay.service.sessionmaker() as s:
            async with s.begin():
                for owner, rcpt in (("far:1:dead", "dead@ext.test"), ("far:2:live", "live@ext.test")):
                    await q.register(s, owner, "far", "another-machine", 1, "1", utcnow() - timedelta(minutes=5))
                    await add_entries(s, [SpoolEntry(
                        message_id=f"<{owner}@example.com>", user="alice", mail_from="alice@example.com",
                        raw=simple_message(to=rcpt, extra=f"Message-ID: <{owner}@example.com>\r\n"),
                        recipients=[SpoolRecipient(rcpt, None, False, False, False, [])],
                        claim_owner=owner, lease_until=utcnow() - timedelta(seconds=1))])  # lapsed
        beating = True

        async def beat_live():
            while beating:
                async with relay.service.sessionmaker() as s:
                    async with s.begin():
                        await q.beat(s, "far:2:live", utcnow())
                await asyncio.sleep(HEARTBEAT_SECONDS / 4)

        beater = asyncio.create_task(beat_live())
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        limit = (STALE_BEATS + 2) * HEARTBEAT_SECONDS
        (first,) = await sink.wait_for(1, timeout=limit + 2)
        assert first.rcpt_tos == ["dead@ext.test"]
        await asyncio.sleep(max(0.0, limit + 2 - (loop.time() - t0)))
        assert [r.rcpt_tos for r in sink.received] == [["dead@ext.test"]]
        assert await relay.rows("SELECT status, lease_owner, reclaims FROM recipients "
                                "WHERE address = 'live@ext.test'") == [("sending", "far:2:live", 0)]
        beating = False
        await beater
        await sink.wait_for(2, timeout=limit + 2)
        assert sorted(r.rcpt_tos[0] for r in sink.received) == ["dead@ext.test", "live@ext.test"]
        await relay.wait_status({"sent"}, 2)
        assert await relay.rows("SELECT address, reclaims FROM recipients ORDER BY address") == [
            ("dead@ext.test", 1), ("live@ext.test", 1)]
        assert await relay.rows("SELECT owner FROM worker_heartbeats") == [(relay.service.worker.owner,)]
    finally:
        await relay.stop()


async def test_an_outcome_settles_only_its_workers_claim(db_url):
    """A worker judged dead whose outcome arrives late (it was only cut off) cannot overwrite the
    copy another worker has claimed since: its deferral would send the copy a third time."""
    from storage import queue as q
    from storage.engine import make_engine, make_sessionmaker
    from storage.migrate import upgrade
    from storage.models import utcnow
    from storage.spool import SpoolEntry, SpoolRecipient, add_entries

    engine = make_engine(db_url)
    try:
        await upgrade(engine)
        sessions = make_sessionmaker(engine)
        async with sessions() as s:
            async with s.begin():
                ((_, (rid,)),) = await add_entries(s, [SpoolEntry(
                    message_id="<late@example.com>", user="alice", mail_from="alice@example.com",
                    raw=simple_message(), recipients=[SpoolRecipient("carol@ext.test", None, False, False, False, [])],
                    claim_owner="w1", lease_until=utcnow())])
                assert await q.free_claims_of(s, ["w1"]) == 1
                (claimed,) = await q.claim(s, "w2", utcnow(), 300, 10)
                assert claimed.id == rid
        late = q.Outcome(rid, claimed.message_pk, "alice", "deferred", "451 4.4.1 Timed out",
                         next_attempt_at=utcnow(), owner="w1")
        await q.record_committed(engine, [late], utcnow())
        async with engine.connect() as conn:
            from sqlalchemy import text
            row = (await conn.execute(text("SELECT status, lease_owner, reclaims FROM recipients"))).one()
            assert tuple(row) == ("sending", "w2", 1)
        await q.record_committed(engine, [q.Outcome(rid, claimed.message_pk, "alice", "sent", "250 2.0.0 OK",
                                                    owner="w2")], utcnow())
        async with engine.connect() as conn:
            row = (await conn.execute(text("SELECT status, lease_owner FROM recipients"))).one()
            assert tuple(row) == ("sent", None)
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_heartbeats_stalled_for_everyone_free_no_claim(tmp_path, sink, pg_url):
    """Two live workers whose heartbeats both stall (their table locked) for longer than the
    others need to judge a worker dead: a stall is one missed renewal, not several, so neither
    frees the other's copies, and every copy is delivered once."""
    from relay.handoff import HEARTBEAT_SECONDS, STALE_BEATS
    from topology import Topology, send_many

    topo = Topology(pg_url, sink.url, tmp_path)
    topo.build(relays=1, workers=2, trackers=0)
    sink.behaviour.data_delay = 0.3
    await topo.start()
    try:
        await wait_until_db(pg_url, "SELECT count(*) FROM worker_heartbeats", 2, timeout=30)
        sending = asyncio.create_task(send_many([p.ports["relay"] for p in topo.of("relay")], 30, 1, concurrency=4))
        await wait_until_db(pg_url, "SELECT count(DISTINCT lease_owner) > 0 FROM recipients WHERE status = 'sending'",
                            True)
        import asyncpg
        conn = await asyncpg.connect(pg_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE worker_heartbeats IN ACCESS EXCLUSIVE MODE")
                await asyncio.sleep(STALE_BEATS * HEARTBEAT_SECONDS + 4)
        finally:
            await conn.close()
        ids = await sending
        await wait_until_db(pg_url, "SELECT count(*) FROM recipients WHERE status <> 'sent'", 0, timeout=60)
        await asyncio.sleep(2 * HEARTBEAT_SECONDS)
        assert await scalar(pg_url, "SELECT coalesce(sum(reclaims), 0) FROM recipients") == 0
        assert await scalar(pg_url, "SELECT count(*) FROM worker_heartbeats") == 2
    finally:
        topo.stop()
    assert sorted(r.data.split(b"Message-ID: ")[1].split(b"\r\n")[0].decode() for r in sink.received) == sorted(ids)
    assert topo.logs_clean()
