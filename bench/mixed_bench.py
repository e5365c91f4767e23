"""Mail while the tracker is busy: SMTP latency with and without a steady stream of opens and clicks.

On SQLite two writers share the database file: the relay's spool (every message fsync'd before its
250) and the tracker's event writer (``tracker.writer_process``: a child process, the default; or
the serving process itself). SQLite lets one of them write at a time (WAL; the other waits, up to
``busy_timeout``), so a busy tracker may slow the 250s. One run measures, for each writer mode,
rows that alternate:

- ``mail alone``: 16 concurrent SMTP clients send ``--messages`` tracked messages (~10 KB HTML,
  one recipient each: a pixel and wrapped links to write);
- ``mail + tracker``: the same, while the tracker gets ``--rate`` requests per second (pixel and
  click URLs of delivered mail, half each) until the last message is accepted.

Placement as in the other scripts: trackrelay pinned to CPU 0; the load generators (SMTP and HTTP)
on CPU 1; the event writer process, when there is one, moved to CPU 1 (on a real host the scheduler
gives it a free core). Delivery is to a maildir (in trackrelay's process). Reported per row: SMTP
messages accepted per second, p50/p99 from the start of a transaction to its 250, the tracker's
achieved requests/s and its p99, and whether every request's event was persisted.

    .venv/bin/python bench/mixed_bench.py [--messages 3000] [--rate 1000] [--rounds 2]
        [--writers process,in-process]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import httpload  # noqa: E402  (bench/ is on sys.path as the script's directory)
from helpers import free_port  # noqa: E402  (tests/ is on sys.path: its helpers)
from relay_bench import PASSWORD, load as smtp_load  # noqa: E402
from tracker_bench import CONFIG, UA, pin0, place_writer, tracked_urls, wait_http  # noqa: E402

EVENTS_SQL = "SELECT count(*) FROM events WHERE type IN ('opened','clicked') AND NOT inferred"


def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[max(0, int(len(values) * 0.99) - 1)] if values else 0.0


async def one_mode(writer: str, args) -> list[dict]:
    from core.passwords import hash_password
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        relay_port, t_port, a_port = free_port(), free_port(), free_port()
        cfg = Path(tmp) / "t.toml"
        db = f"{tmp}/t.db"
        cfg.write_text(CONFIG.format(relay_port=relay_port, t_port=t_port, a_port=a_port, tmp=tmp,
                                     db_url=f"sqlite+aiosqlite:///{db}", password_hash=hash_password(PASSWORD),
                                     writer_process="true" if writer == "process" else "false"))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([sys.executable, "-m", "trackrelay.cli", "-c", str(cfg), "serve"],
                                preexec_fn=pin0, env=env)
        try:
            await wait_http(f"http://127.0.0.1:{t_port}/healthz")
            if writer == "process":
                await place_writer(proc.pid, 1, 0)
            pixels, clicks = await tracked_urls(tmp, relay_port, PASSWORD)
            urls = [u for pair in zip(pixels, clicks) for u in pair]
            # --unknown-tokens: pixels of tokens no message has (served, buffered and looked up by
            # the writer like any other, but no row written): the tracker's load without its writes.
            load_urls = [u.rsplit("/", 1)[0] + f"/unknown{i:012d}xyz.gif" for i, u in enumerate(pixels)] \
                if args.unknown_tokens else urls

            def persisted() -> int:
                with sqlite3.connect(db) as conn:
                    return conn.execute(EVENTS_SQL).fetchone()[0]

            async def wait_persisted(expected: int) -> int:
                deadline = time.monotonic() + 120
                while (c := await asyncio.to_thread(persisted)) < expected and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                return c

            await smtp_load(relay_port, 200, 4, True)  # warm-up of both sides
            await httpload.load(urls, 1000, 8, UA)
            sent = 1000
            await wait_persisted(sent)
            for r in range(args.rounds):
                for mixed in ((False, True) if r % 2 == 0 else (True, False)):
                    accepted = asyncio.Event()
                    before = await asyncio.to_thread(persisted)
                    http = None
                    if mixed:
                        http = asyncio.create_task(httpload.load(load_urls, 10**9, args.connections, UA, rate=args.rate,
                                                                 stop=accepted.is_set))
                        await asyncio.sleep(0.5)  # the tracker's load under way before the mail starts
                    t0 = time.perf_counter()
                    lat = await smtp_load(relay_port, args.messages, args.clients, True)
                    elapsed = time.perf_counter() - t0
                    accepted.set()
                    row = {"writer": writer, "mixed": mixed, "accepted_per_s": args.messages / elapsed,
                           "p50_ms": statistics.median(lat) * 1000, "p99_ms": p99(lat) * 1000,
                           "http_per_s": 0.0, "http_p99_ms": 0.0, "requests": 0, "persisted": 0}
                    if http is not None:
                        took, http_lat = await http
                        row.update(http_per_s=len(http_lat) / took, http_p99_ms=p99(http_lat) * 1000,
                                   requests=len(http_lat))
                        expected = 0 if args.unknown_tokens else len(http_lat)
                        row["persisted"] = await wait_persisted(before + expected) - before
                    rows.append(row)
                    print(f"  {writer:10} {'mail + tracker' if mixed else 'mail alone':15} "
                          f"{row['accepted_per_s']:6.0f} msg/s  p50 {row['p50_ms']:6.1f}  p99 {row['p99_ms']:6.1f} ms"
                          + (f"  tracker {row['http_per_s']:5.0f}/s p99 {row['http_p99_ms']:.1f} ms "
                             f"persisted {row['persisted']}/{row['requests']}" if mixed else ""), flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    return rows


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=3000, help="SMTP messages per row")
    ap.add_argument("--clients", type=int, default=16, help="concurrent SMTP clients")
    ap.add_argument("--rate", type=float, default=1000, help="tracker requests per second in the mixed rows")
    ap.add_argument("--connections", type=int, default=16, help="the tracker load's keep-alive connections")
    ap.add_argument("--rounds", type=int, default=2, help="each mode's pair of rows, alternating which goes first")
    ap.add_argument("--unknown-tokens", action="store_true",
                    help="the mixed rows' tracker load on pixels of unknown tokens: served and looked up, "
                         "nothing written (what the events' writes cost the mail, by difference)")
    ap.add_argument("--writers", default="process,in-process",
                    help="tracker.writer_process modes to measure (comma-separated)")
    args = ap.parse_args()
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {1})
    rows = []
    for writer in args.writers.split(","):
        rows += await one_mode(writer, args)

    print(f"\n{args.messages} tracked messages of ~10 KB HTML per row, {args.clients} SMTP clients; the tracker "
          f"paced at {args.rate:.0f} requests/s over {args.connections} connections in the mixed rows"
          + (" (pixels of unknown tokens: nothing written)" if args.unknown_tokens else "") + "\n")
    print("| event writer | tracker load | accepted msg/s | p50 to 250 (ms) | p99 to 250 (ms) | "
          "tracker requests/s | tracker p99 (ms) | events persisted |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['writer']} | {'yes' if r['mixed'] else 'none'} | {r['accepted_per_s']:.0f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | " + (f"{r['http_per_s']:.0f} | {r['http_p99_ms']:.1f} | "
                                        f"{r['persisted']:,}/{r['requests']:,} |" if r["mixed"] else "– | – | – |"))


if __name__ == "__main__":
    asyncio.run(main())
