"""Scale-out on one machine: 1 and 2 of each role (`serve --only relay|worker|tracker`) sharing
one PostgreSQL. Measures messages per second (accepted and delivered, 3 recipients each) and
tracker events per second (pixel + click requests until every event is in the database), and the
CPU each process and PostgreSQL used, to show what limits it.

    TRACKRELAY_TEST_PG_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/test \\
        .venv/bin/python bench/scale_bench.py [--messages 1000] [--hits 10000]

It uses its own database (trackrelay_bench), created and emptied by the script.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from helpers import Sink  # noqa: E402
from topology import Topology, hit_trackers, send_many  # noqa: E402
from pg import fresh_db, postgres_cpu, scalar  # noqa: E402  (bench/ is the script's directory)
from proc_cpu import cpu_seconds  # noqa: E402


async def run(n: int, messages: int, hits: int) -> dict:
    url = await fresh_db()
    sink = await Sink().start()
    with tempfile.TemporaryDirectory() as tmp:
        topo = Topology(url, sink.url, Path(tmp), n=n)
        topo.build()
        await topo.start()
        try:
            cpu0 = {id(p): cpu_seconds(p.popen.pid) for p in topo.procs}
            pg0 = postgres_cpu()
            t0 = time.perf_counter()
            await send_many([p.ports["relay"] for p in topo.of("relay")], messages, 3, concurrency=16)
            t_acc = time.perf_counter() - t0
            await sink.wait_for(3 * messages, timeout=600)
            t_del = time.perf_counter() - t0
            mail_cpu = {p.role + str(i): cpu_seconds(p.popen.pid) - cpu0[id(p)]
                        for i, p in enumerate(topo.procs)}
            pg_mail = postgres_cpu() - pg0

            urls = []
            for r in sink.received[:300]:
                urls += [u.decode() for u in re.findall(rb'(?:src|href)="(http://[^"]+/(?:o|c)/[^"]+)"', r.data)]
            sql = "SELECT count(*) FROM events WHERE type IN ('opened','clicked') AND NOT inferred"
            cpu1 = {id(p): cpu_seconds(p.popen.pid) for p in topo.procs}
            pg1 = postgres_cpu()
            t1 = time.perf_counter()
            await hit_trackers(urls, [p.ports["tracker"] for p in topo.of("tracker")], topo.public_port, hits)
            t_http = time.perf_counter() - t1
            while await scalar(url, sql) < hits and time.perf_counter() - t1 < 300:
                await asyncio.sleep(0.1)
            t_ev = time.perf_counter() - t1
            written = await scalar(url, sql)
            hit_cpu = {p.role + str(i): cpu_seconds(p.popen.pid) - cpu1[id(p)] for i, p in enumerate(topo.procs)}
            pg_hits = postgres_cpu() - pg1
        finally:
            topo.stop()
            await sink.stop()
    return {"n": n, "accepted": messages / t_acc, "delivered": messages / t_del, "t_del": t_del,
            "mail_cpu": mail_cpu, "pg_mail": pg_mail, "requests": hits / t_http, "events": written / t_ev,
            "written": written, "hits": hits, "t_ev": t_ev, "hit_cpu": hit_cpu, "pg_hits": pg_hits}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--hits", type=int, default=10000)
    args = ap.parse_args()
    results = [await run(n, args.messages, args.hits) for n in (1, 2)]
    print(f"{args.messages} messages x 3 recipients, {args.hits} pixel/click requests; "
          "all processes, PostgreSQL and the load on one 2-core machine\n")
    print("| of each role | msg/s accepted | msg/s delivered (copies/s) | tracker requests/s | events/s persisted |")
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['n']} | {r['accepted']:.0f} | {r['delivered']:.0f} ({3 * r['delivered']:.0f}) | "
              f"{r['requests']:.0f} | {r['events']:.0f} ({r['written']}/{r['hits']}) |")
    for r in results:
        print(f"\n{r['n']} of each, CPU seconds during the mail phase ({r['t_del']:.1f} s): " +
              ", ".join(f"{k} {v:.1f}" for k, v in r["mail_cpu"].items()) + f", postgres {r['pg_mail']:.1f}")
        print(f"{r['n']} of each, CPU seconds during the tracker phase ({r['t_ev']:.1f} s): " +
              ", ".join(f"{k} {v:.1f}" for k, v in r["hit_cpu"].items()) + f", postgres {r['pg_hits']:.1f}")


if __name__ == "__main__":
    asyncio.run(main())
