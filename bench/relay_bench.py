"""Relay throughput: trackrelay (spool + delivery) against a bare aiosmtpd → aiosmtplib pass-through.

One run measures both, side by side, on this machine:
- the server under test runs as a subprocess pinned to CPU 0;
- the load generator (16 concurrent SMTP clients, 10 KB HTML messages) and the upstream sink run
  in this process, pinned to CPU 1.
Reported: messages per second until the sink has every message, and p50/p99 time from the start
of a transaction to its final 250.

    .venv/bin/python bench/relay_bench.py [--messages 2000] [--clients 16] [--rounds 1]
        [--rows bare,postfix,untracked,tracked,logged] [--compare DIR]

The postfix row (bench/postfix.py) runs a private Postfix instance as the mature MTA beside them;
it needs root and installs Debian's postfix package if it is missing.

``--compare DIR`` measures the checkout in DIR too (e.g. ``git worktree add /tmp/before <commit>``),
run by this venv's python with PYTHONPATH=DIR from DIR and checked first to import its own code
(``checkout.py``): each trackrelay row gets a twin right beside it in every round, and the ratios
of each round's pair are printed under the table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib
from aiosmtpd.smtp import SMTP

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import checkout  # noqa: E402  (bench/ is on sys.path as the script's directory)
import postfix  # noqa: E402  (bench/postfix.py: a private Postfix instance, the mature MTA's row)
from helpers import free_port  # noqa: E402  (tests/ is on sys.path: its helpers)
from proc_cpu import cpu_seconds  # noqa: E402  (bench/ is on sys.path as the script's directory)

PASSWORD = "bench-password"
PROFILE_DIR: str | None = None
STDERR_DIR = os.environ.get("RELAY_BENCH_STDERR")  # keep each server's stderr there


def html_message(i: int, size: int = 10_000) -> bytes:
    para = ('<p style="margin:0 0 12px">Hello, this is paragraph text for the benchmark with a '
            '<a href="https://example.com/product?id=%d&amp;ref=mail">link</a>.</p>\r\n')
    body = []
    while sum(map(len, body)) < size:
        body.append(para % len(body))
    html = "<html><body>\r\n" + "".join(body) + "</body></html>\r\n"
    return (f"From: Alice <alice@example.com>\r\nTo: carol{i}@ext.test\r\nSubject: bench {i}\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}").encode()


class CountingSink:
    """The upstream: aiosmtpd, offering PIPELINING as real smarthosts (Postfix, Exchange, the big
    providers) do — aiosmtpd reads pipelined commands in order; aiosmtplib never pipelines."""

    def __init__(self):
        self.count = 0
        self.copies = 0
        self.done = asyncio.Event()
        self.want = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return responses[:-1] + ["250-PIPELINING", responses[-1]]

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        self.copies += len(envelope.rcpt_tos)
        if self.copies >= self.want:
            self.done.set()
        return "250 2.0.0 OK"


# -- the bare pass-through relay (the baseline) ------------------------------------------------

class PassThrough:
    """aiosmtpd in, aiosmtplib out: answers 250 after the upstream's 250, nothing spooled."""

    def __init__(self, upstream_port: int, pool: int = 4):
        self.port = upstream_port
        self.pool: asyncio.Queue = asyncio.Queue()
        for _ in range(pool):
            self.pool.put_nowait(None)

    async def handle_DATA(self, server, session, envelope):
        client = await self.pool.get()
        try:
            if client is None:
                client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, start_tls=False,
                                         local_hostname="bare.test")
                await client.connect()
            await client.sendmail(envelope.mail_from, envelope.rcpt_tos, envelope.original_content)
        finally:
            self.pool.put_nowait(client)
        return "250 2.0.0 OK"


def run_bare(listen_port: int, upstream_port: int) -> None:
    async def main():
        handler = PassThrough(upstream_port)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="bare.test", decode_data=False, auth_required=False),
            "127.0.0.1", listen_port)
        await server.serve_forever()
    asyncio.run(main())


# -- load ----------------------------------------------------------------------------------------

RECIPIENTS = 1


async def load(port: int, n: int, clients: int, auth: bool) -> list[float]:
    latencies: list[float] = []
    counter = iter(range(n))

    async def worker():
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, local_hostname="load.test",
                            timeout=60)
        await c.connect()
        if auth:
            await c.login("alice", PASSWORD)
        for i in counter:
            msg = html_message(i)
            t0 = time.perf_counter()
            rcpts = [f"carol{i}@ext.test"] + [f"carol{i}-{k}@ext.test" for k in range(1, RECIPIENTS)]
            await c.sendmail("alice@example.com", rcpts, msg)
            latencies.append(time.perf_counter() - t0)
        await c.quit()

    await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies


async def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


async def measure(name: str, argv: list[str], port: int, sink: CountingSink, n: int, clients: int,
                  auth: bool, env: dict | None = None, cwd: Path | None = None) -> dict:
    if PROFILE_DIR:  # py-spy samples the server (collapsed stacks: one line per stack and its count)
        out = Path(PROFILE_DIR) / (name.split(",")[-1].strip().replace(" ", "_").replace("/", "-") + ".txt")
        argv = [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw", "--rate", "250",
                "--nonblocking", "-o", str(out), "--"] + argv
    # The server's stderr to a file: a pipe nobody reads would stall a server that logs much.
    errfile = tempfile.TemporaryFile() if not STDERR_DIR else open(Path(STDERR_DIR) / f"{free_port()}.err", "w+b")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errfile, env=env, cwd=cwd,
                            preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    try:
        try:
            await wait_port(port)
        except RuntimeError:
            proc.terminate()
            proc.wait(30)
            errfile.seek(0)
            err = errfile.read()
            raise RuntimeError(f"{name}: nothing listens on {port}; its stderr:\n{err.decode(errors='replace')}")
        sink.count, sink.copies = 0, 0  # the previous row's copies must not end the warm-up's wait
        await load(port, 50, 4, auth)  # warm up
        await asyncio.wait_for(_until(sink, 50 * RECIPIENTS), 120)
        sink.count, sink.copies, sink.want = 0, 0, n * RECIPIENTS
        sink.done.clear()
        cpu0 = cpu_seconds(proc.pid)
        t0 = time.perf_counter()
        lat = await load(port, n, clients, auth)
        t_accepted = time.perf_counter() - t0
        await asyncio.wait_for(sink.done.wait(), 300)
        t_delivered = time.perf_counter() - t0
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        if PROFILE_DIR:  # the server (py-spy's child) ends; py-spy then writes its stacks
            for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
                os.kill(int(child), 15)
        else:
            proc.terminate()
        proc.wait(60)
    lat.sort()
    return {
        "name": name, "messages": n,
        "accepted_per_s": n / t_accepted,
        "delivered_per_s": n / t_delivered,
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000,
        "cpu_ms": cpu / n * 1000,
    }


async def _until(sink: CountingSink, n: int) -> None:
    while sink.copies < n:
        await asyncio.sleep(0.01)


async def measure_trackrelay(track: bool, sink: CountingSink, sink_port: int, n: int, clients: int,
                             log: bool = False, root: Path = ROOT, tag: str = "") -> dict:
    from core.passwords import hash_password
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cfg = Path(tmp) / "trackrelay.toml"
        cfg.write_text(f"""
[relay]
listen = "127.0.0.1:{port}"
hostname = "relay.bench.test"
[upstream]
url = "smtp://127.0.0.1:{sink_port}"
starttls = false
[storage]
url = "sqlite+aiosqlite:///{tmp}/trackrelay.db"
[tracker]
listen = "127.0.0.1:{free_port()}"
secret_keys = ["bench-key-0123456789abcdef"]
[api]
listen = "127.0.0.1:{free_port()}"
[tracking]
allow = {"true" if track else "false"}
[crm]
default_log = {"true" if log else "false"}
[log]
level = "warning"
[[users]]
name = "alice"
password_hash = "{hash_password(PASSWORD)}"
addresses = ["alice@example.com"]
""")
        label = ("tracked (pixel + wrapped links per copy)" if track else "untracked") + \
            (", CRM logging every message" if log else "")
        return await measure(f"trackrelay{tag}, SQLite, fsync before 250, {label}",
                             [sys.executable, "-m", "trackrelay.cli", "-c", str(cfg), "serve"],
                             port, sink, n, clients, auth=True, env=checkout.env(root), cwd=root)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1, help="alternated rounds; medians are reported")
    ap.add_argument("--rows", default="bare,postfix,untracked,tracked,logged",
                    help="which rows to measure (comma-separated; the ratios need bare)")
    ap.add_argument("--recipients", type=int, default=1, help="recipients per message (one copy each)")
    ap.add_argument("--profile", metavar="DIR", help="run each server under py-spy, stacks to DIR (not for figures)")
    ap.add_argument("--compare", metavar="DIR",
                    help="also measure the checkout in DIR (e.g. a `git worktree` of an earlier commit): "
                         "each trackrelay row gets a twin row ' (DIR's name)' in the same alternated rounds")
    args = ap.parse_args()
    global PROFILE_DIR, RECIPIENTS
    PROFILE_DIR = args.profile
    RECIPIENTS = args.recipients
    rows = set(args.rows.split(","))
    compare_root = Path(args.compare).resolve() if args.compare else None
    if compare_root:  # before any figure: each checkout's server runs its own code
        commits = {"this tree": checkout.verify(ROOT), compare_root.name: checkout.verify(compare_root)}
    if os.cpu_count() and os.cpu_count() >= 2:
        os.sched_setaffinity(0, {1})

    sink = CountingSink()
    loop = asyncio.get_running_loop()
    sink_server = await loop.create_server(lambda: SMTP(sink, hostname="sink.test", decode_data=False),
                                           "127.0.0.1", 0)
    sink_port = sink_server.sockets[0].getsockname()[1]
    order = [r for r in ("bare", "postfix", "untracked", "tracked", "logged") if r in rows]
    if args.compare:  # the earlier checkout's row right after the current one's: same conditions
        order = [x for r in order for x in ((r,) if r in ("bare", "postfix") else (r, r + "@compare"))]
    spec = {"untracked": (False, False), "tracked": (True, False), "logged": (True, True)}
    runs: dict[str, list[dict]] = {r: [] for r in order}
    for rnd in range(args.rounds):
        # Rows alternate, the order reversed every other round: a drift of the shared machine's
        # speed falls on every row alike.
        for row in (order if rnd % 2 == 0 else order[::-1]):
            if row == "bare":
                port = free_port()
                r = await measure("bare aiosmtpd → aiosmtplib pass-through",
                                  [sys.executable, __file__, "--bare", str(port), str(sink_port)],
                                  port, sink, args.messages, args.clients, auth=False)
            elif row == "postfix":
                r = await postfix.measure_postfix(sink, sink_port, args.messages, args.clients,
                                                  load=load, until=_until, recipients=RECIPIENTS)
            else:
                kind, _, compare = row.partition("@")
                root, tag = (compare_root, f" ({compare_root.name})") if compare else (ROOT, "")
                r = await measure_trackrelay(spec[kind][0], sink, sink_port, args.messages, args.clients,
                                             spec[kind][1], root=root, tag=tag)
            runs[row].append(r)
            print(f"round {rnd + 1} {row}: {r['accepted_per_s']:.0f} accepted/s, "
                  f"{r['delivered_per_s']:.0f} delivered/s, p99 {r['p99_ms']:.1f} ms, "
                  f"{r['cpu_ms']:.2f} ms CPU/msg", flush=True)
    sink_server.close()

    def med(row, key):
        return statistics.median(r[key] for r in runs[row])

    print(f"\n{args.messages} messages of ~10 KB HTML to {RECIPIENTS} recipient(s) each, {args.clients} concurrent clients; "
          f"server on CPU 0, load and sink on CPU 1; medians of {args.rounds} alternated rounds"
          + ("".join(f"; trackrelay{'' if k == 'this tree' else f' ({k})'} = {v}" for k, v in commits.items())
             if compare_root else "") + "\n")
    print("| server | accepted msg/s | delivered msg/s | p50 to 250 (ms) | p99 to 250 (ms) | server CPU ms/msg "
          "| accepted / bare | delivered / bare | p99 / bare |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in order:
        ratios = " | – | – | –"
        if "bare" in runs and row != "bare":
            ratios = (f" | {med(row, 'accepted_per_s') / med('bare', 'accepted_per_s'):.2f}"
                      f" | {med(row, 'delivered_per_s') / med('bare', 'delivered_per_s'):.2f}"
                      f" | {med(row, 'p99_ms') / med('bare', 'p99_ms'):.2f}")
        print(f"| {runs[row][0]['name']} | {med(row, 'accepted_per_s'):.0f} | {med(row, 'delivered_per_s'):.0f} | "
              f"{med(row, 'p50_ms'):.1f} | {med(row, 'p99_ms'):.1f} | {med(row, 'cpu_ms'):.2f}{ratios} |")
    if compare_root:  # a row and its twin ran next to each other in every round: ratios of pairs
        print(f"\nthis tree / {compare_root.name}, each round's pair, lowest first (median); above 1: more msg/s, "
              "or a higher p99, or more CPU:")
        for row in order:
            if row in ("bare", "postfix") or row.endswith("@compare"):
                continue
            cells = []
            for key, label in (("accepted_per_s", "accepted msg/s"), ("delivered_per_s", "delivered msg/s"),
                               ("p99_ms", "p99"), ("cpu_ms", "CPU ms/msg")):
                xs = sorted(a[key] / b[key] for a, b in zip(runs[row], runs[row + "@compare"]))
                cells.append(f"{label} {', '.join(f'{x:.2f}' for x in xs)} ({statistics.median(xs):.2f})")
            print(f"- {row}: " + "; ".join(cells))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--bare":
        run_bare(int(sys.argv[2]), int(sys.argv[3]))
    else:
        asyncio.run(main())
