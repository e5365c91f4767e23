"""Probe, not product: the tracker with its recorder in a process of its own.

`trackrelay serve` records events on its own event loop (classification) and on SQLite's thread
(the rows); on one core that work is what keeps it under the bare handler's throughput
(bench/README.md, "Where a saturated server's time goes"), and moving SQLite's thread to the other
core made it worse (the GIL). This probe measures the remaining design: the serving process keeps
only the handlers and hands the hits, pickled in batches every 50 ms, over a socket to a child
process that runs the real ``Recorder`` (classification, SQLite writes) with its own engine,
pinned to the CPUs ``PROBE_CHILD_CPU`` lists (tracker_bench.py: CPU 1) and, when
``PROBE_CHILD_NICE`` says so, at a lower priority (so that it takes only what the load generator
sharing its core leaves).

What it leaves out, and a real design would need: the serving process's ``/metrics`` see no
written or dropped counts, the live stream is not told of new events, hits in flight are lost if
the child dies, and the child is a second writer of the SQLite file beside the relay's spool (the
benchmark sends no mail during its rows, so the two never wait for each other here).

    python bench/writer_probe.py -c CONFIG serve      (as ``trackrelay -c CONFIG serve``)

``tracker_bench.py --probe-writer-process`` runs it in place of ``trackrelay serve``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import socket
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracker_http import app as tracker_app  # noqa: E402
from tracker_http.recorder import FLUSH_INTERVAL, SignedInIps, Stats  # noqa: E402

_LEN = struct.Struct("!I")


class ProcessRecorder:
    """Stands in for ``Recorder`` in the serving process: ``add`` appends to a list, and every
    FLUSH_INTERVAL the list goes pickled to the child."""

    def __init__(self, config, sessionmaker, apple, signed_in=None, on_written=None):
        self.config = config
        self.signed_in = signed_in or SignedInIps()
        self.stats = Stats()
        self._buf: list[tuple] = []
        self._task: asyncio.Task | None = None
        self._child: subprocess.Popen | None = None
        self._writer: asyncio.StreamWriter | None = None

    def add(self, hit: tuple) -> None:
        self._buf.append(hit)

    @property
    def depth(self) -> int:
        return len(self._buf)

    def start(self) -> None:
        ours, theirs = socket.socketpair()
        self._child = subprocess.Popen([sys.executable, __file__, "--child", os.environ["PROBE_CONFIG"],
                                        str(theirs.fileno())], pass_fds=[theirs.fileno()])
        theirs.close()
        self._task = asyncio.create_task(self._run(ours))

    async def _run(self, sock: socket.socket) -> None:
        _, self._writer = await asyncio.open_unix_connection(sock=sock)
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            await self._send()

    async def _send(self) -> None:
        if self._buf and self._writer:
            data = pickle.dumps(self._buf, protocol=pickle.HIGHEST_PROTOCOL)
            self._buf = []
            self._writer.write(_LEN.pack(len(data)) + data)
            await self._writer.drain()

    async def stop(self, grace: float = 5.0) -> None:
        if self._task:
            self._task.cancel()
        await self._send()
        if self._writer:
            self._writer.close()
        if self._child:
            await asyncio.to_thread(self._child.wait, 30)


async def _child(config_path: str, fd: int) -> None:
    """The child: the real Recorder, fed from the socket until it closes."""
    from storage.engine import make_engine, make_sessionmaker
    from tracker_http.app import apple_ranges_path
    from tracker_http.netaddr import RangeSet
    from tracker_http.recorder import Recorder
    from trackrelay import config as config_mod

    if os.environ.get("PROBE_CHILD_NICE"):
        os.nice(int(os.environ["PROBE_CHILD_NICE"]))
    if os.environ.get("PROBE_CHILD_CPU"):
        os.sched_setaffinity(0, {int(c) for c in os.environ["PROBE_CHILD_CPU"].split(",")})
    cfg = config_mod.load(config_path)
    engine = make_engine(cfg.storage.url)
    recorder = Recorder(cfg, make_sessionmaker(engine), RangeSet.from_file(apple_ranges_path(cfg)))
    recorder.start()
    gc.freeze()  # as `trackrelay serve` does once started
    reader, _ = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    try:
        while True:
            head = await reader.readexactly(_LEN.size)
            for hit in pickle.loads(await reader.readexactly(_LEN.unpack(head)[0])):
                recorder.add(hit)
    except asyncio.IncompleteReadError:
        pass
    await recorder.stop()
    await engine.dispose()


def main() -> int:
    if sys.argv[1] == "--child":
        asyncio.run(_child(sys.argv[2], int(sys.argv[3])))
        return 0
    args = sys.argv[1:]
    os.environ["PROBE_CONFIG"] = args[args.index("-c") + 1]
    tracker_app.Recorder = ProcessRecorder
    from trackrelay.cli import main as cli_main
    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
