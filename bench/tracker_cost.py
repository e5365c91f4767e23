"""What a pixel or redirect costs trackrelay beyond the bare response, part by part, in process.

The HTTP benchmark (tracker_bench.py) measures the whole server, but this machine's speed drifts by
up to 40 % between runs. This script isolates trackrelay's own work for one request: the handler
(the public listener's, its path dispatched; called with aiohttp's test request, so no socket
work) and the recording of its event (classifying the batch, then writing it to SQLite; the
recorder in process, ``tracker.writer_process = false``), against a handler that only builds the
same response. Then whole requests, the bare app's (tracker_bench.py's: aiohttp's application and
router) and trackrelay's public listener: the request's bytes handed to aiohttp's protocol on a
transport that keeps nothing, parsed, dispatched, handled and the response written, one request
in flight as a keep-alive client sends them (no socket, no kernel; recording not included). A
whole request plus its recording is what one core spends per request with the writer beside it,
but for the kernel's socket work, which is the same for both servers, and the hand-over to the
writer process (a pickled tuple: well under a microsecond a hit).

    .venv/bin/python bench/tracker_cost.py [--requests 20000]             # CPU µs (process time)
    .venv/bin/python bench/tracker_cost.py --requests 3000 --instructions  # under valgrind: exact
    .venv/bin/python bench/tracker_cost.py --requests 3000 --instructions --loop uvloop  # as `serve` runs

With ``--instructions`` the script runs itself under callgrind and counts the instructions of each
part (all threads, SQLite's included), which repeat to the instruction whatever else the machine
does; it takes a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracker_bench import CONFIG, free_port, tracked_urls  # noqa: E402  (bench/ is on sys.path as the script's directory)

UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"


class Meter:
    """CPU seconds of this process; under callgrind also the instructions since the last start()."""

    def __init__(self, instructions: bool):
        self.instructions = instructions
        self.dumps = 0

    async def _control(self, flag: str) -> None:
        p = await asyncio.create_subprocess_exec("callgrind_control", flag, str(os.getpid()),
                                                 stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await p.wait()

    async def start(self) -> None:
        if self.instructions:
            await self._control("-z")
        self.t0 = time.process_time()

    async def stop(self) -> tuple[float, int | None]:
        cpu = time.process_time() - self.t0
        if not self.instructions:
            return cpu, None
        await self._control("-d")
        self.dumps += 1
        out = Path(os.environ["TRACKRELAY_COST_OUT"] + f".{self.dumps}")
        for _ in range(100):
            if out.exists() and "summary:" in (text := out.read_text()):
                return cpu, int(re.search(r"^summary: (\d+)", text, re.M).group(1))
            await asyncio.sleep(0.1)
        raise RuntimeError(f"no callgrind dump at {out}")


class Sink(asyncio.Transport):
    """What aiohttp's protocol asks of a connection's transport; it counts the responses written
    (a status line of 200 or 302 each) and wakes the client when the one it waits for is out."""

    def __init__(self):
        super().__init__()
        self.ok = 0
        self._waiter: asyncio.Future | None = None

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def is_closing(self) -> bool:
        return False

    def write(self, data) -> None:
        if data.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 302 ")):
            self.ok += 1
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    def writelines(self, chunks) -> None:
        self.write(b"".join(chunks))

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    async def serve(self, protocol, requests: list[bytes], n: int) -> None:
        loop = asyncio.get_running_loop()
        for i in range(n):
            self._waiter = loop.create_future()
            protocol.data_received(requests[i % len(requests)])
            await self._waiter


async def main(n: int, instructions: bool) -> None:
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    import tracker_http.public as public
    from core import config as config_mod
    from core.passwords import hash_password
    from trackrelay.service import Service

    tmp = tempfile.mkdtemp()
    relay_port = free_port()
    cfg = config_mod.from_dict(tomllib.loads(CONFIG.format(  # the HTTP benchmark's configuration
        relay_port=relay_port, t_port=free_port(), a_port=free_port(), tmp=tmp,
        db_url=f"sqlite+aiosqlite:///{tmp}/t.db", password_hash=hash_password("pw"),
        writer_process="false")), "tracker_cost")  # the recorder in process: measured part by part
    service = Service(cfg)
    await service.start()
    try:
        pixel_urls, click_urls = await tracked_urls(tmp, relay_port)
        pixels = [u.rsplit("/o/", 1)[1][:-len(".gif")] for u in pixel_urls]
        clicks = [u.rsplit("/c/", 1)[1] for u in click_urls]
        await asyncio.sleep(1)  # the copies' outcomes committed
        # Only the tracker from here on: the relay's and worker's timers would count too.
        await service.stop()
        service = Service(cfg, roles=("tracker",))
        await service.start()

        class Peer:  # what the handlers ask of the connection
            def get_extra_info(self, name, default=None):
                return ("127.0.0.1", 50000) if name == "peername" else default

            def is_closing(self):
                return False

        listener = public.listener(service.tracker.ctx, "")  # the public listener's one handler
        recorder = service.tracker.recorder
        recorder._task.cancel()  # flushed here, part by part

        def requests(kind: str) -> list:
            if kind == "pixel":
                return [make_mocked_request("GET", f"/o/{t}.gif", headers={"User-Agent": UA}, transport=Peer())
                        for t in pixels]
            return [make_mocked_request("GET", f"/c/{c}", headers={"User-Agent": UA}, transport=Peer())
                    for c in clicks]

        async def bare_pixel(request):  # the responses of tracker_bench.py's bare app
            return web.Response(body=public.GIF, content_type="image/gif",
                                headers={"Cache-Control": public.NO_STORE, "Pragma": "no-cache", "Expires": "0",
                                         "Referrer-Policy": "no-referrer"})

        async def bare_redirect(request):
            return web.Response(status=302, headers={"Location": "https://example.com/p/0",
                                                     "Cache-Control": public.NO_STORE, "Referrer-Policy": "no-referrer"})

        async def flush() -> None:
            while recorder.depth:
                if not await recorder.flush_once():
                    raise RuntimeError("writing events failed")

        meter = Meter(instructions)
        results: list[tuple[str, float, int | None]] = []
        for name, handler, kind in (("bare pixel (the response only)", bare_pixel, "pixel"),
                                    ("trackrelay pixel handler (its path dispatched)", listener, "pixel"),
                                    ("bare redirect (the response only)", bare_redirect, "redirect"),
                                    ("trackrelay redirect handler (its path dispatched)", listener, "redirect")):
            reqs = requests(kind)
            for i in range(1000):  # warm-up
                await handler(reqs[i % len(reqs)])
            await flush()
            await meter.start()
            for i in range(n):
                await handler(reqs[i % len(reqs)])
            results.append((name, *await meter.stop()))
            if handler not in (bare_pixel, bare_redirect):
                written = recorder.stats.written
                await meter.start()
                await flush()
                results.append((f"  its event recorded ({kind}: classified, written to SQLite)", *await meter.stop()))
                assert recorder.stats.written - written == n, "every event written"

        # Whole requests in process: aiohttp's protocol, its parser, the routing, the handler and
        # the response written, from the request's bytes to the response's (a transport that
        # keeps nothing: no socket, no kernel), one request in flight as a keep-alive client does.
        bare_app = web.Application()
        bare_app.router.add_get("/o/{token}.gif", bare_pixel)
        bare_app.router.add_get("/c/{rest}", bare_redirect)
        bare_runner = web.AppRunner(bare_app, access_log=None)
        await bare_runner.setup()
        ours = service.tracker._runners[0]
        paths = {"pixel": [urlsplit(u).path for u in pixel_urls], "redirect": [urlsplit(u).path for u in click_urls]}
        for name, runner, kind in (("bare pixel, whole request", bare_runner, "pixel"),
                                   ("trackrelay pixel, whole request", ours, "pixel"),
                                   ("bare redirect, whole request", bare_runner, "redirect"),
                                   ("trackrelay redirect, whole request", ours, "redirect")):
            reqs = [f"GET {p} HTTP/1.1\r\nHost: t.example\r\nUser-Agent: {UA}\r\n\r\n".encode()
                    for p in paths[kind]]
            sink = Sink()
            protocol = runner.server()
            protocol.connection_made(sink)
            await sink.serve(protocol, reqs, 1000)  # warm-up
            await flush()
            await meter.start()
            await sink.serve(protocol, reqs, n)
            results.append((name, *await meter.stop()))
            assert sink.ok == n + 1000, (name, sink.ok)
            protocol.connection_lost(None)
            await flush()
        await bare_runner.cleanup()
    finally:
        await service.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{n} requests per part, after 1,000 warm-up requests; in one process on SQLite, "
          f"on {type(asyncio.get_running_loop()).__module__.split('.')[0]}'s event loop\n")
    print("| part | CPU µs per request |" + (" instructions per request |" if instructions else "")
          + "\n|---|---:|" + ("---:|" if instructions else ""))
    for name, cpu, ir in results:
        print(f"| {name} | {cpu / n * 1e6:.1f} |" + (f" {ir // n:,} |" if ir is not None else ""))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--instructions", action="store_true", help="count instructions under valgrind's callgrind")
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                    help="the event loop every part runs on (`serve` runs on uvloop, tracker_bench.py's bare app on asyncio's)")
    args = ap.parse_args()
    if args.instructions and "TRACKRELAY_COST_OUT" not in os.environ:
        if not shutil.which("valgrind"):
            sys.exit("--instructions needs valgrind (apt-get install valgrind)")
        with tempfile.TemporaryDirectory() as out:
            base = f"{out}/callgrind.out"
            sys.exit(subprocess.call(["valgrind", "--tool=callgrind", "-q", f"--callgrind-out-file={base}",
                                      sys.executable, __file__, "--requests", str(args.requests), "--instructions",
                                      "--loop", args.loop],
                                     env=dict(os.environ, TRACKRELAY_COST_OUT=base)))
    if args.loop == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main(args.requests, args.instructions))
    else:
        asyncio.run(main(args.requests, args.instructions))
