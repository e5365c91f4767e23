"""Tracker throughput: trackrelay's pixel and redirect against a bare aiohttp handler.

One run, side by side: both servers are subprocesses pinned to CPU 0 (a bare aiohttp app returning
the same GIF or 302 with the same headers, asked for the very same paths, and `trackrelay serve` on
SQLite); the load generator (``httpload.py``: raw asyncio connections, 32 concurrent, keep-alive;
aiohttp's own client was too slow to saturate the bare server) runs here on CPU 1. Rows of bare
and trackrelay alternate for several rounds, the server not under load stopped (SIGSTOP), so a
drift of the machine's speed falls on both. After each trackrelay row, every
request's event is counted in the database. Server CPU is given in all and for the event loop's
thread alone (the rest of trackrelay's is mostly SQLite's thread writing the events), and the
server's disk writes (``write_bytes`` of /proc/<pid>/io: SQLite's WAL and its checkpoints).

    .venv/bin/python bench/tracker_bench.py [--requests 20000] [--rounds 3] [--kinds pixel,redirect]
        [--db sqlite|postgresql] [--writer process|in-process] [--writer-cpu 1] [--writer-nice 0]
        [--compare DIR]

With ``--db postgresql`` trackrelay writes to the database trackrelay_bench on the server of
TRACKRELAY_TEST_PG_URL (dropped and created first), and the PostgreSQL server's CPU per request is
reported beside the server's: it is not pinned, so it shares both cores with everything else.

``--writer process`` (the default, as ``tracker.writer_process = true``): trackrelay's event
writer is a child process (tracker_http/writer.py). It inherits the server's pinning to CPU 0;
the script moves it to ``--writer-cpu`` (CPU 1, beside the load generator: on a real host the
scheduler gives it a free core) at the niceness ``--writer-nice`` adds, and counts its CPU in
the server's. ``--writer in-process`` measures ``tracker.writer_process = false``: classification
and SQLite's thread on the server's own core.

``--compare DIR`` (SQLite only) adds a second trackrelay: the checkout in DIR (e.g. ``git worktree
add /tmp/before <commit>``), run by this venv's python with PYTHONPATH=DIR from DIR, with its own
directory, ports, database and configuration, checked first to import its own code
(``checkout.py``). It takes its rows in the same alternated rounds (every server but the one
under load stopped), and its ratios to bare and this tree's to it are printed beside.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import checkout  # noqa: E402  (bench/ is on sys.path as the script's directory)
import httpload  # noqa: E402
from helpers import free_port  # noqa: E402  (tests/ is on sys.path: its helpers)
from pg import fresh_db, postgres_cpu, scalar  # noqa: E402  (bench/ is on sys.path as the script's directory)
from proc_cpu import cpu_seconds, main_thread_cpu_seconds, write_bytes  # noqa: E402

UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"
BARE = r'''
import sys
from aiohttp import web
GIF = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")
NO_STORE = "no-store, no-cache, must-revalidate, private, max-age=0"
# The very responses trackrelay sends (same status, body and headers), without its work.
async def pixel(request):
    return web.Response(body=GIF, content_type="image/gif",
                        headers={"Cache-Control": NO_STORE, "Pragma": "no-cache", "Expires": "0",
                                 "Referrer-Policy": "no-referrer"})
async def click(request):
    return web.Response(status=302, headers={"Location": "https://example.com/p/0", "Cache-Control": NO_STORE,
                                             "Referrer-Policy": "no-referrer"})
app = web.Application()
app.router.add_get("/o/{token}.gif", pixel)
app.router.add_get("/c/{rest}", click)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
'''


async def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url, allow_redirects=False):
                    return
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} does not answer")


async def load(urls: list[str], n: int, concurrency: int = 32) -> tuple[float, list[float]]:
    return await httpload.load(urls, n, concurrency, UA)


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def server_cpu(pid: int) -> float:
    """CPU of a server process and its children (trackrelay's event writer process)."""
    return cpu_seconds(pid) + sum(cpu_seconds(c) for c in children(pid))


async def place_writer(pid: int, cpu: int, nice: int) -> int:
    """trackrelay's event writer process moved to its CPU (it inherits the server's pinning)."""
    deadline = time.monotonic() + 30
    while not (found := children(pid)):
        if time.monotonic() > deadline:
            raise RuntimeError("trackrelay started no event writer process")
        await asyncio.sleep(0.05)
    (writer,) = found
    os.sched_setaffinity(writer, {cpu})
    for task in Path(f"/proc/{writer}/task").iterdir():  # threads started already keep their own
        os.sched_setaffinity(int(task.name), {cpu})
    if nice:
        os.setpriority(os.PRIO_PROCESS, writer, os.getpriority(os.PRIO_PROCESS, writer) + nice)
    return writer


def pin0():
    os.sched_setaffinity(0, {0})


def server_write_bytes(pid: int) -> int:
    return write_bytes(pid) + sum(write_bytes(c) for c in children(pid))


def writer_cpu(pid: int) -> float:
    return sum(cpu_seconds(c) for c in children(pid))


def summary(name: str, elapsed: float, lat: list[float], cpu: float, loop_cpu: float, pg_cpu: float,
            written: int, child_cpu: float) -> dict:
    lat.sort()
    return {"name": name, "rps": len(lat) / elapsed, "p99": lat[int(len(lat) * 0.99) - 1] * 1000,
            "p50": lat[len(lat) // 2] * 1000, "cpu_us": cpu / len(lat) * 1e6,
            "loop_us": loop_cpu / len(lat) * 1e6, "pg_us": pg_cpu / len(lat) * 1e6,
            "writer_us": child_cpu / len(lat) * 1e6,
            "written_kb": written / len(lat) / 1000}


CONFIG = """
[relay]
listen = "127.0.0.1:{relay_port}"
hostname = "relay.bench.test"
[upstream]
url = "maildir://{tmp}/outbox"
[storage]
url = "{db_url}"
[tracker]
writer_process = {writer_process}
listen = "127.0.0.1:{t_port}"
public_url = "http://127.0.0.1:{t_port}"
secret_keys = ["bench-key-0123456789abcdef"]
[api]
listen = "127.0.0.1:{a_port}"
[tracking]
scanner_window_seconds = 0
[log]
level = "warning"
[[users]]
name = "alice"
password_hash = "{password_hash}"
addresses = ["alice@example.com"]
"""


async def tracked_urls(tmp: str, relay_port: int, password: str = "pw") -> tuple[list[str], list[str]]:
    """Send one message to 50 recipients through the relay; the pixel and click URLs delivered."""
    import aiosmtplib
    links = "".join(f'<a href="https://example.com/p/{i}">product {i}</a><br>' for i in range(5))
    msg = ("From: alice@example.com\r\nTo: carol@ext.test\r\nSubject: b\r\nMIME-Version: 1.0\r\n"
           "Content-Type: text/html; charset=utf-8\r\n\r\n<html><body><p>Hello</p>" + links +
           "</body></html>\r\n")
    rcpts = [f"r{i}@ext.test" for i in range(50)]
    await aiosmtplib.send(msg, sender="alice@example.com", recipients=rcpts, hostname="127.0.0.1",
                          port=relay_port, username="alice", password=password, start_tls=False,
                          source_address=("127.0.0.2", 0))
    outbox = Path(tmp) / "outbox" / "new"
    deadline = time.monotonic() + 30
    while len(list(outbox.glob("*"))) < len(rcpts) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    pixels, clicks = [], []
    for f in outbox.glob("*"):
        data = f.read_bytes()
        pixels += [u.decode() for u in re.findall(rb'src="(http://[^"]+/o/[^"]+)"', data)]
        clicks += [u.decode() for u in re.findall(rb'href="(http://[^"]+/c/[^"]+)"', data)]
    return pixels, clicks


class Trackrelay:
    """One `trackrelay serve` of a checkout: its own temp dir, ports, database and configuration."""

    def __init__(self, name: str, root: Path, tmp: str, db_url: str, in_process: bool, password_hash: str):
        self.name, self.root, self.tmp, self.db_url = name, root, tmp, db_url
        self.relay_port, self.t_port, a_port = free_port(), free_port(), free_port()
        cfg = Path(tmp) / "t.toml"
        cfg.write_text(CONFIG.format(relay_port=self.relay_port, t_port=self.t_port, a_port=a_port, tmp=tmp,
                                     db_url=db_url, password_hash=password_hash,
                                     writer_process="false" if in_process else "true"))
        # In the checkout's directory: `python -m` and the writer's `python -c` put it first on sys.path.
        self.proc = subprocess.Popen([sys.executable, "-m", "trackrelay.cli", "-c", str(cfg), "serve"],
                                     preexec_fn=pin0, env=checkout.env(root), cwd=root)
        self.total = 0  # tracked requests sent to it so far (each one event)
        self.persisted = 0

    async def count(self, sql: str) -> int:
        if self.db_url.startswith("sqlite"):
            def count_sqlite() -> int:
                with sqlite3.connect(f"{self.tmp}/t.db") as db:
                    return db.execute(sql).fetchone()[0]
            return await asyncio.to_thread(count_sqlite)
        return await scalar(self.db_url, sql)

    async def wait_persisted(self) -> int:
        """Wait until every request's event is in the database (or 120 s)."""
        sql = "SELECT count(*) FROM events WHERE type IN ('opened','clicked') AND NOT inferred"
        deadline = time.monotonic() + 120
        while (c := await self.count(sql)) < self.total and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.persisted = c
        return c


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000, help="requests per row and round")
    ap.add_argument("--rounds", type=int, default=3, help="bare and trackrelay rows alternate this often")
    ap.add_argument("--kinds", default="pixel,redirect", help="which handlers to measure (comma-separated)")
    ap.add_argument("--writer", choices=("process", "in-process"), default="process",
                    help="tracker.writer_process: the event writer in a child process (the default) or "
                         "in the serving process")
    ap.add_argument("--writer-cpu", type=int, default=1, help="the CPU the writer process is moved to")
    ap.add_argument("--writer-nice", type=int, default=0, help="niceness added to the writer process")
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite",
                    help="trackrelay's database: SQLite (the embedded default) or PostgreSQL (database "
                         "trackrelay_bench on the server of TRACKRELAY_TEST_PG_URL, emptied first)")
    ap.add_argument("--compare", metavar="DIR",
                    help="also measure the checkout in DIR (e.g. a `git worktree` of an earlier commit): a "
                         "second trackrelay (its own directory, ports and SQLite database) in the same "
                         "alternated rounds, its rows and ratios beside this tree's (SQLite only)")
    args = ap.parse_args()
    if args.compare and args.db != "sqlite":
        ap.error("--compare runs on SQLite only (two servers would share the one PostgreSQL database "
                 "trackrelay_bench and its server's CPU); leave out --db postgresql")
    n = args.requests
    kinds = args.kinds.split(",")
    compare_root = Path(args.compare).resolve() if args.compare else None
    commits = {}
    if compare_root:  # before any figure: each checkout's server runs its own code
        commits = {"trackrelay": checkout.verify(ROOT), f"trackrelay ({compare_root.name})": checkout.verify(compare_root)}
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {1})
    from core.passwords import hash_password
    password_hash = hash_password("pw")
    in_process = args.writer == "in-process"

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        bare = subprocess.Popen([sys.executable, "-c", BARE, str(port)], preexec_fn=pin0)
        # name → its server; "trackrelay" is this tree, "trackrelay@compare" the checkout in DIR
        trackrelays = {"trackrelay": Trackrelay(
            "trackrelay", ROOT, tmp, f"sqlite+aiosqlite:///{tmp}/t.db" if args.db == "sqlite" else await fresh_db(),
            in_process, password_hash)}
        if compare_root:
            (Path(tmp) / "compare").mkdir()
            ctmp = f"{tmp}/compare"
            trackrelays["trackrelay@compare"] = Trackrelay(
                "trackrelay@compare", compare_root, ctmp, f"sqlite+aiosqlite:///{ctmp}/t.db", in_process, password_hash)
        servers = {"bare": bare} | {name: t.proc for name, t in trackrelays.items()}
        try:
            await wait_http(f"http://127.0.0.1:{port}/o/x.gif")
            urls: dict[tuple[str, str], list[str]] = {}
            for name, t in trackrelays.items():
                await wait_http(f"http://127.0.0.1:{t.t_port}/healthz")
                if not in_process:
                    await place_writer(t.proc.pid, args.writer_cpu, args.writer_nice)
                pixels, clicks = await tracked_urls(t.tmp, t.relay_port)
                urls[(name, "pixel")], urls[(name, "redirect")] = pixels, clicks
            # The bare server gets the very same paths as this tree's trackrelay (a long signed click
            # path costs aiohttp's parsing and routing more than a short one).
            tracker, plain = f"http://127.0.0.1:{trackrelays['trackrelay'].t_port}/", f"http://127.0.0.1:{port}/"
            for kind in ("pixel", "redirect"):
                urls[("bare", kind)] = [u.replace(tracker, plain) for u in urls[("trackrelay", kind)]]

            # Only the server under load runs: the others are stopped (SIGSTOP) during a row.
            for name in servers:
                for kind in kinds:
                    await load(urls[(name, kind)], 1000)
                    if name in trackrelays:
                        trackrelays[name].total += 1000
            for t in trackrelays.values():
                await t.wait_persisted()
            rows: dict[tuple[str, str], list[dict]] = {}
            order = list(servers)
            for r in range(args.rounds):
                for kind in kinds:
                    # alternate which goes first, so a drift of the machine's speed is shared
                    for name in (order if r % 2 == 0 else order[::-1]):
                        server = servers[name]
                        others = [p for other, p in servers.items() if other != name]
                        for p in others:
                            p.send_signal(signal.SIGSTOP)
                        try:
                            # server CPU from the row's first request until its last event is written
                            cpu0, loop0 = server_cpu(server.pid), main_thread_cpu_seconds(server.pid)
                            child0 = writer_cpu(server.pid)
                            written0 = server_write_bytes(server.pid)
                            pg0 = postgres_cpu()
                            elapsed, lat = await load(urls[(name, kind)], n)
                            if name in trackrelays:
                                trackrelays[name].total += n
                                await trackrelays[name].wait_persisted()
                            cpu = server_cpu(server.pid) - cpu0
                            loop_cpu = main_thread_cpu_seconds(server.pid) - loop0
                            child_cpu = writer_cpu(server.pid) - child0
                            written = server_write_bytes(server.pid) - written0
                            pg_cpu = postgres_cpu() - pg0 if args.db == "postgresql" else 0.0
                        finally:
                            for p in others:
                                p.send_signal(signal.SIGCONT)
                        rows.setdefault((name, kind), []).append(
                            summary(f"{name} {kind}", elapsed, lat, cpu, loop_cpu, pg_cpu, written, child_cpu))
        finally:
            for server in servers.values():
                server.send_signal(signal.SIGCONT)
                server.terminate()
            bare.wait()
            for t in trackrelays.values():
                t.proc.wait(30)

    def label(name: str) -> str:
        return f"trackrelay ({compare_root.name})" if name == "trackrelay@compare" else name

    pg = args.db == "postgresql"
    names = list(servers)
    print(f"{n} requests per row, {args.rounds} rounds ({', '.join(map(label, names))} alternating), after 1,000 "
          "warm-up requests each; 32 concurrent keep-alive connections; server on CPU 0, load on CPU 1; "
          f"trackrelay on {'PostgreSQL (its server unpinned, on both cores)' if pg else 'SQLite'}"
          + ("; the event writer in the server process" if in_process else
             f"; the event writer process on CPU {args.writer_cpu}"
             + (f" at nice +{args.writer_nice}" if args.writer_nice else "") + " (its CPU counted in the server's)")
          + "".join(f"; {k} = {v}" for k, v in commits.items())
          + "\n")
    print("| server | round | requests/s | p50 (ms) | p99 (ms) | server CPU µs per request "
          "| of which the event loop's | of which the writer process's "
          "| server's disk writes per request (KB) |"
          + (" PostgreSQL's CPU µs per request |" if pg else "")
          + "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if pg else ""))
    for kind in kinds:
        for name in names:
            for i, r in enumerate(rows[(name, kind)], 1):
                print(f"| {'bare aiohttp' if name == 'bare' else label(name)} {kind} | {i} | {r['rps']:.0f} "
                      f"| {r['p50']:.1f} | {r['p99']:.1f} | {r['cpu_us']:.0f} "
                      f"| {r['loop_us']:.0f} | {r['writer_us']:.0f} | {r['written_kb']:.2f} |" + (f" {r['pg_us']:.0f} |" if pg else ""))

    def series(xs: list[float]) -> str:
        xs = sorted(xs)
        return f"{', '.join(f'{x:.2f}' for x in xs)} (median {statistics.median(xs):.2f})"

    for kind in kinds:
        for name in trackrelays:
            pairs = list(zip(rows[("bare", kind)], rows[(name, kind)]))
            print(f"\n{kind}: {label(name)} / bare by requests/s, rounds lowest first: "
                  f"{series([o['rps'] / b['rps'] for b, o in pairs])}; by CPU per request (event written included"
                  f"{', PostgreSQL’s CPU too' if pg else ''}) "
                  f"{series([b['cpu_us'] / (o['cpu_us'] + o['pg_us']) for b, o in pairs])}; by the event "
                  f"loop's CPU alone (the bound of any design that writes the events off the loop's core) "
                  f"{series([b['loop_us'] / o['loop_us'] for b, o in pairs])}")
        if compare_root:  # the two ran in the same rounds, one right after the other (or with bare between)
            pairs = list(zip(rows[("trackrelay@compare", kind)], rows[("trackrelay", kind)]))
            print(f"\n{kind}: trackrelay / trackrelay ({compare_root.name}), each round's pair, lowest first "
                  f"(above 1: this tree is faster, or spends less CPU): by requests/s "
                  f"{series([o['rps'] / b['rps'] for b, o in pairs])}; by CPU per request "
                  f"{series([b['cpu_us'] / o['cpu_us'] for b, o in pairs])}; by the event loop's CPU "
                  f"{series([b['loop_us'] / o['loop_us'] for b, o in pairs])}; by p99 (below 1: lower) "
                  f"{series([o['p99'] / b['p99'] for b, o in pairs])}")
    print()
    for name, t in trackrelays.items():
        print(f"{label(name)}: events persisted: {t.persisted} of {t.total} requests")


if __name__ == "__main__":
    asyncio.run(main())
