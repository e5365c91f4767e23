"""Beyond one machine (real PostgreSQL): 2 relays, 2 workers, 2 trackers as subprocesses."""

from __future__ import annotations

import asyncio
import re
import signal
from collections import Counter

import pytest

from topology import Topology, hit_trackers, send_many

pytestmark = [pytest.mark.postgres, pytest.mark.slow]




async def count(db_url: str, sql: str) -> int:
    import asyncpg
    conn = await asyncpg.connect(db_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def test_only_roles_need_postgresql_and_configured_keys(tmp_path):
    import sys
    from helpers import base_config, free_port, to_toml
    cfg = base_config(db_url=f"sqlite+aiosqlite:///{tmp_path}/x.db", relay_port=free_port(),
                      upstream_url="maildir://" + str(tmp_path / "out"), tmp=tmp_path)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "trackrelay.cli", "-c", str(path), "serve",
                                                "--only", "worker", stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 1 and b"needs PostgreSQL" in err


async def test_two_of_each_role_deliver_every_copy_and_record_every_hit_once(tmp_path, sink, pg_url):
    topo = Topology(pg_url, sink.url, tmp_path, n=2)
    topo.build()
    await topo.start()
    try:
        relays = [p.ports["relay"] for p in topo.of("relay")]
        sending = asyncio.create_task(send_many(relays, 2000, 3, concurrency=8))
        # SIGKILL one worker midway through the deliveries.
        while len(sink.received) < 1500:
            await asyncio.sleep(0.05)
        victim = topo.of("worker")[0]
        assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
        ids = await sending
        assert len(ids) == 2000
        await sink.wait_for(6000, timeout=240)
        await asyncio.sleep(8)  # a lapsed lease (6 s) would have been reclaimed by now
        per_copy = Counter()
        for r in sink.received:
            mid = re.search(rb"^Message-ID: (\S+)", r.data, re.M).group(1).decode()
            per_copy[(mid, r.rcpt_tos[0])] += 1
        wanted = {(f"<scale-{i}@example.com>", f"r{i}-{j}@ext.test") for i in range(2000) for j in range(3)}
        assert set(per_copy) == wanted  # every copy delivered
        duplicates = sum(v - 1 for v in per_copy.values())
        reclaims = await count(pg_url, "SELECT coalesce(sum(reclaims), 0) FROM recipients")
        assert await count(pg_url, "SELECT count(*) FROM recipients WHERE status <> 'sent'") == 0
        assert duplicates <= reclaims, (duplicates, reclaims)  # each explained by a lapsed lease

        # 10,000 pixel and click requests spread over both trackers, each recorded exactly once.
        urls = []
        for r in sink.received[:400]:
            urls += [u.decode() for u in re.findall(rb'(?:src|href)="(http://[^"]+/(?:o|c)/[^"]+)"', r.data)]
        trackers = [p.ports["tracker"] for p in topo.of("tracker")]
        await hit_trackers(urls, trackers, topo.public_port, 10_000)
        sql = "SELECT count(*) FROM events WHERE type IN ('opened', 'clicked') AND NOT inferred"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while await count(pg_url, sql) < 10_000 and loop.time() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        assert await count(pg_url, sql) == 10_000
    finally:
        topo.stop()
    assert topo.logs_clean()
