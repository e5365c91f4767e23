"""`serve`'s event loop choice (core.aio): uvloop when installed, TRACKRELAY_EVENT_LOOP to choose."""

import asyncio
import signal
import sys

import pytest

from core import aio


def test_the_choice_by_environment(monkeypatch):
    uvloop = pytest.importorskip("uvloop")
    for value in ("", "auto", "uvloop", " UVLOOP "):
        monkeypatch.setenv(aio.EVENT_LOOP_ENV, value)
        assert aio.loop_factory() is uvloop.new_event_loop
    monkeypatch.setenv(aio.EVENT_LOOP_ENV, "asyncio")
    assert aio.loop_factory() is None
    monkeypatch.setenv(aio.EVENT_LOOP_ENV, "tokio")
    with pytest.raises(ValueError, match="TRACKRELAY_EVENT_LOOP"):
        aio.loop_factory()


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop: ImportError
    monkeypatch.setenv(aio.EVENT_LOOP_ENV, "auto")
    assert aio.loop_factory() is None
    monkeypatch.setenv(aio.EVENT_LOOP_ENV, "uvloop")
    with pytest.raises(ImportError):
        aio.loop_factory()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_run_on_the_chosen_loop_and_the_writer_child_keeps_the_signal_mask(monkeypatch, loop):
    """The event writer child is born with SIGINT and SIGTERM blocked on either loop (libuv's own
    spawn would clear the mask: tracker_http.writer spawns by subprocess)."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    import subprocess
    from tracker_http.writer import _HELD_SIGNALS, _Child
    monkeypatch.setenv(aio.EVENT_LOOP_ENV, loop)

    async def main():
        assert aio.loop_name() == loop
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
        try:
            child = _Child(subprocess.Popen(
                [sys.executable, "-c", "print(next(l for l in open('/proc/self/status') if l.startswith('SigBlk')))"],
                stdout=subprocess.PIPE))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        assert await asyncio.wait_for(child.wait(), 30) == 0
        with child._popen.stdout as out:
            return int(out.read().split()[1], 16)

    blocked = aio.run(main())
    for s in _HELD_SIGNALS:
        assert blocked & (1 << (s - 1))
