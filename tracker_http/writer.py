"""The event writer process: the recorder's classification and database writes off the serving core.

With ``tracker.writer_process = true`` (the default) the tracker starts one child process
(``tracker_http.writer.main``) that runs the real ``Recorder`` — token look-ups,
classification, the event rows, the contact dates and their commit — and ``WriterClient`` stands
in for the recorder in the serving process: ``add`` appends the hit to a deque, and every
SEND_INTERVAL what came in goes to the child, pickled, over a socket pair. On a host with a second
core the database's work runs beside the requests instead of between them (bench/README.md).

Nothing is lost when the child dies. The serving process keeps every hit until the child reports
it out of its buffer (written, or of a token the database does not know), starts another child
and sends it again whatever was not reported. The child writes under the idempotency keys of the
serving process — its prefix and each hit's position in the stream of hits — so a hit written
but not yet reported when the child died is not written twice.

The protocol, both ways frames of a 4-byte length and a pickle (the child is ours and the socket
pair private to the two processes):

- to the child: ``("init", config, key_prefix, position, signed_in)`` once, then
  ``("hits", [hit, ...], signed_in_since)``. End of file means stop: the child writes what it
  holds (for up to the recorder's grace at stop) and exits.
- to the serving process, after every batch tried: ``("ack", position, written, batches,
  unknown_tokens, failures, classified)`` — how far the stream has left the child's buffer, and
  the child's counters since it started (``classified``: the recorder's Stats.classified).

The child ignores SIGINT and SIGTERM (a terminal's Ctrl-C and systemd's stop reach the whole
process group), from its birth: they are blocked across its spawn until its first line ignores
them. It stops when the serving process closes its end of the socket, which happens too when the
serving process is killed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from tracker_http.recorder import BATCH_MAX, BUFFER_MAX, Hit, SignedInIps, Stats, dropped, new_key_prefix
from core.aio import cancel, finish
from core.config import Config

log = logging.getLogger("trackrelay.tracker")

#: How often what came in goes to the child (sooner when BATCH_MAX hits wait).
SEND_INTERVAL = 0.02
#: What the child gets at stop to write what it holds (the recorder's own grace), and beyond it to exit.
GRACE = 5.0
EXIT_SECONDS = 5.0
#: A child that lived this long restarts after the shortest wait again.
STABLE_SECONDS = 30.0
_COUNTERS = ("written", "batches", "unknown_tokens", "failures")
_LEN = struct.Struct("!I")


def _send(writer: asyncio.StreamWriter, message: tuple) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_LEN.pack(len(data)) + data)


async def _receive(reader: asyncio.StreamReader) -> tuple:
    """The next frame; asyncio.IncompleteReadError at the end of the stream."""
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    return pickle.loads(await reader.readexactly(size))


class WriterClient:
    """The recorder as the serving process sees it (``add``, ``depth``, ``stats``, ``start``,
    ``stop``), its work done by a child process."""

    def __init__(self, config: Config, signed_in: SignedInIps, on_written=None):
        self.config = config
        self.signed_in = signed_in
        self.on_written = on_written
        self.stats = Stats()
        self._unsent: deque[Hit] = deque()
        self._inflight: deque[Hit] = deque()  # sent to the running child, not yet reported written
        self._acked = 0  # the stream position of _inflight[0]
        self._prefix = new_key_prefix()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._signed_in_sent = 0.0
        self.pid: int | None = None  # the running child's
        self._renew = False  # a reload: the child ends after writing what it holds, a new one starts

    # -- the hot path ------------------------------------------------------------------------

    def add(self, hit: Hit) -> None:
        unsent = self._unsent
        if len(unsent) + len(self._inflight) >= BUFFER_MAX:
            dropped(self.stats)
            return
        unsent.append(hit)
        if len(unsent) >= BATCH_MAX:
            self._wake.set()

    @property
    def depth(self) -> int:
        """Hits not yet written: waiting here or in the child's buffer."""
        return len(self._unsent) + len(self._inflight)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="event-writer")

    def reconfigure(self, config: Config) -> None:
        """A reload (SIGHUP): the running child writes what it holds and exits, and the next one
        starts at once with ``config`` and the Apple ranges as they are now."""
        self.config = config
        self._renew = True
        self._wake.set()

    async def stop(self, grace: float = GRACE) -> None:
        self._stop.set()
        self._wake.set()
        await finish(self._task, grace + 2 * EXIT_SECONDS + 5)  # the child's writing, its exit, its kill
        self._task = None
        if self.depth:
            log.error("stopping with %d events not written (database unavailable)", self.depth)

    async def _supervise(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                await self._run_child()
            except Exception:
                log.exception("event writer process failed")
            # The child has exited: what it did not report written goes to the next one.
            self._unsent.extendleft(reversed(self._inflight))
            self._inflight.clear()
            if self._stop.is_set():
                return
            if self._renew:  # ended on purpose by a reload: no back-off
                self._renew = False
                log.info("event writer process restarted with the reloaded configuration")
                continue
            self.stats.writer_restarts += 1
            if time.monotonic() - started > STABLE_SECONDS:
                backoff = 0.5
            log.warning("event writer process exited; starting another in %.1f s (%d events kept)",
                        backoff, self.depth)
            try:
                await asyncio.wait_for(self._stop.wait(), backoff)
            except asyncio.TimeoutError:
                pass
            backoff = min(backoff * 2, 10.0)

    async def _run_child(self) -> None:
        ours, theirs = socket.socketpair()
        # The child is born with SIGINT and SIGTERM blocked (a mask survives fork and exec), so a
        # group-wide signal during its interpreter's start-up stays pending until its first line
        # has set them to ignored, which discards it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
        try:
            proc = _Child(subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=_child_env()))
        except BaseException:
            ours.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            theirs.close()
        self.pid = proc.pid
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        reading = asyncio.create_task(self._read(reader), name="event-writer-reports")
        try:
            now = time.time()
            _send(writer, ("init", self.config, self._prefix, self._acked, self.signed_in.seen_since(0.0)))
            self._signed_in_sent = now
            while not reading.done():
                try:
                    await asyncio.wait_for(self._wake.wait(), SEND_INTERVAL)
                except asyncio.TimeoutError:
                    pass
                self._wake.clear()
                await self._send_hits(writer)
                if self._stop.is_set() or self._renew:
                    writer.write_eof()  # the child writes what it holds, reports and exits
                    await asyncio.wait({reading}, timeout=GRACE + EXIT_SECONDS)
                    break
        except (ConnectionError, OSError) as exc:
            log.warning("event writer process unreachable: %s", exc)
        finally:
            writer.close()
            await cancel(reading)  # ended already, unless the child outstayed its grace
            await _reap(proc)
            self.pid = None

    async def _send_hits(self, writer: asyncio.StreamWriter) -> None:
        now = time.time()
        seen = self.signed_in.seen_since(self._signed_in_sent)
        if not self._unsent and not seen:
            return
        hits = list(self._unsent)
        self._unsent.clear()
        self._inflight.extend(hits)
        _send(writer, ("hits", hits, seen))
        self._signed_in_sent = now
        await writer.drain()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """The child's reports until it closes: written hits leave ``_inflight``."""
        last = dict.fromkeys(_COUNTERS, 0)  # this child's counters as last reported
        last_classified: dict = {}
        stats = self.stats
        try:
            while True:
                _, position, *counts, classified = await _receive(reader)
                if position - self._acked == len(self._inflight):
                    self._inflight.clear()
                else:
                    for _ in range(position - self._acked):
                        self._inflight.popleft()
                self._acked = position
                for name, count in zip(_COUNTERS, counts):
                    setattr(stats, name, getattr(stats, name) + count - last[name])
                for key, count in classified.items():
                    stats.classified[key] = stats.classified.get(key, 0) + count - last_classified.get(key, 0)
                last_classified = classified
                written = counts[0] - last["written"]
                last.update(zip(_COUNTERS, counts))
                if written and self.on_written:
                    self.on_written()
        except (asyncio.IncompleteReadError, ConnectionError):
            return


def _child_env() -> dict[str, str]:
    """The child imports this very code: the directory holding these packages goes first on its path."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""))


class _Child:
    """The writer process, awaited through its pidfd on any event loop.

    Spawned by ``subprocess`` rather than the loop's ``subprocess_exec``: uvloop's (libuv's
    ``uv_spawn``) clears the signal mask in the child before exec, which would let a group-wide
    SIGINT or SIGTERM during the child's start-up kill it (_HELD_SIGNALS); ``subprocess`` keeps
    the mask, on asyncio's loop and uvloop alike. A fork at start and at a restart only."""

    def __init__(self, popen: subprocess.Popen):
        self._popen = popen
        self.pid = popen.pid

    async def wait(self) -> int:
        if self._popen.poll() is not None:
            return self._popen.returncode
        loop = asyncio.get_running_loop()
        fd = os.pidfd_open(self.pid)
        try:
            exited = loop.create_future()
            loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
            try:
                if self._popen.poll() is None:
                    await exited
            finally:
                loop.remove_reader(fd)
        finally:
            os.close(fd)
        return self._popen.wait()

    def kill(self) -> None:
        self._popen.kill()


async def _reap(proc: _Child) -> None:
    try:
        await asyncio.wait_for(proc.wait(), EXIT_SECONDS)
    except asyncio.TimeoutError:
        log.error("event writer process %d did not exit: killed", proc.pid)
        proc.kill()
        await proc.wait()


# -- the child ---------------------------------------------------------------------------------

async def _child(fd: int) -> None:
    from storage.engine import make_engine, make_sessionmaker
    from tracker_http import classify
    from tracker_http.netaddr import RangeSet, apple_ranges_path
    from tracker_http.recorder import Recorder
    from core import logs

    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    _, config, prefix, position, seen = await _receive(reader)
    logs.setup(config.log)
    classify.warm_up()
    signed_in = SignedInIps()
    signed_in.merge(seen)
    engine = make_engine(config.storage.url)
    recorder = Recorder(config, make_sessionmaker(engine), RangeSet.from_file(apple_ranges_path(config)),
                        signed_in, key_prefix=prefix, position=position)

    def report() -> None:
        st = recorder.stats
        _send(writer, ("ack", recorder.position, *(getattr(st, name) for name in _COUNTERS), dict(st.classified)))

    recorder.on_flushed = report
    recorder.start()
    gc.freeze()  # as `trackrelay serve` does: what is loaded now is never garbage
    try:
        while True:
            _, hits, seen = await _receive(reader)
            signed_in.merge(seen)
            recorder.add_many(hits)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    await recorder.stop(GRACE)
    try:
        await writer.drain()
        writer.close()
    except ConnectionError:
        pass
    await engine.dispose()


def main() -> None:
    from core import aio
    aio.run(_child(int(sys.argv[1])))  # the serving process's loop (TRACKRELAY_EVENT_LOOP, inherited)


#: Held (blocked) across the child's start: it must never die of the group's stop signals.
_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: The child's command: the held signals, blocked since its birth, set to ignored (which drops a
#: pending one) and then unblocked, on its first line, before the imports.
_CHILD = ("import signal; held = {%s}; [signal.signal(s, signal.SIG_IGN) for s in held]; "
          "signal.pthread_sigmask(signal.SIG_UNBLOCK, held); import tracker_http.writer as w; w.main()"
          % ", ".join(f"signal.{s.name}" for s in _HELD_SIGNALS))
