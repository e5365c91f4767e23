"""The event writer process (tracker.writer_process, the default): a real child process, killed."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from helpers import API_TOKENS, RelayProcess, free_port, to_toml, wait_until
from test_tracker import api, browser, events, send_tracked, start
from tracker_http import writer as writer_module
from tracker_http.writer import WriterClient


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def click_many(t, n: int, rcpt: str = "carol@ext.test") -> None:
    """n clicks, each of its own reader (agent), so that each is one event of its own."""
    url = t.clicks(rcpt)[0]
    async with browser() as s:
        for i in range(n):
            async with s.get(url, allow_redirects=False, headers={"User-Agent": f"reader {i}"}) as r:
                assert r.status == 302


async def clicks_written(relay) -> int:
    return len([r for r in await events(relay, timeout=0) if r[0] == "clicked"])


async def test_events_are_written_by_a_child_process(relay, sink):
    await start(relay)
    recorder = relay.service.tracker.recorder
    assert isinstance(recorder, WriterClient)
    t = await send_tracked(relay)
    await wait_until(lambda: recorder.pid is not None, what="the writer process")
    assert recorder.pid != os.getpid() and alive(recorder.pid)
    await click_many(t, 3)
    rows = await events(relay, want=4)
    assert sorted(r[0] for r in rows) == ["clicked", "clicked", "clicked", "opened"]  # and one inferred open
    await wait_until(lambda: recorder.depth == 0 and recorder.stats.written == 4, what="the reports")


async def test_a_killed_writer_is_replaced_and_every_hit_is_written_once(relay, sink):
    await start(relay)
    recorder = relay.service.tracker.recorder
    t = await send_tracked(relay)
    await wait_until(lambda: recorder.pid is not None)
    first = recorder.pid
    await click_many(t, 50)
    os.kill(first, signal.SIGKILL)  # whatever it held, written or not
    await click_many(t, 50)
    await wait_until(lambda: recorder.stats.writer_restarts == 1 and recorder.pid not in (None, first),
                     what="a new writer process")
    await wait_until(lambda: recorder.depth == 0, what="every hit written")
    assert not alive(first)
    rows = await events(relay, want=101)
    assert len([r for r in rows if r[0] == "clicked"]) == 100 and len(rows) == 101  # plus the inferred open


async def test_hits_written_but_not_reported_are_not_written_twice(relay, sink, monkeypatch):
    """The child commits a batch and dies before the serving process hears of it: the next child
    gets the same hits again, under the same idempotency keys."""
    real_read = WriterClient._read

    async def deaf(self, reader):  # this child's reports never arrive
        try:
            while True:
                await writer_module._receive(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    monkeypatch.setattr(WriterClient, "_read", deaf)
    await start(relay)
    recorder = relay.service.tracker.recorder
    t = await send_tracked(relay)
    await click_many(t, 20)
    for _ in range(400):
        if await clicks_written(relay) == 20:
            break
        await asyncio.sleep(0.05)
    assert await clicks_written(relay) == 20 and recorder.depth == 20  # all kept: none reported
    monkeypatch.setattr(WriterClient, "_read", real_read)  # the next child is heard
    first = recorder.pid
    os.kill(first, signal.SIGKILL)
    await wait_until(lambda: recorder.pid not in (None, first) and recorder.depth == 0, what="the resend")
    rows = await events(relay, want=22, timeout=1)
    assert await clicks_written(relay) == 20 and len(rows) == 21  # each click once, one inferred open


async def test_a_stop_signal_during_the_writers_start_up_does_not_end_it(relay, sink, monkeypatch):
    """systemd signals the whole group; a writer still starting its interpreter (here slowed by
    half a second before its first line) must not die of it before it can ignore the signal."""
    monkeypatch.setattr(writer_module, "_CHILD", "import time; time.sleep(0.5); " + writer_module._CHILD)
    await start(relay)
    recorder = relay.service.tracker.recorder
    await wait_until(lambda: recorder.pid is not None, what="the writer process")
    pid = recorder.pid
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGINT)
    await asyncio.sleep(1.0)
    assert alive(pid) and recorder.pid == pid and recorder.stats.writer_restarts == 0
    t = await send_tracked(relay)
    await click_many(t, 2)
    await wait_until(lambda: recorder.depth == 0 and recorder.stats.written == 3, what="the events written")


async def test_self_classification_sees_the_api_sign_ins_of_the_serving_process(relay, sink):
    """The `self` heuristic's signed-in addresses are known to the serving process (the API); the
    writer process classifies with them."""
    await start(relay)
    t = await send_tracked(relay)  # submitted from 127.0.0.2; the reader and the API user are on 127.0.0.1
    async with browser() as s:
        async with s.get(api(relay) + "/api/v1/events",
                         headers={"Authorization": f"Bearer {API_TOKENS['alice']}"}) as r:
            assert r.status == 200
        async with s.get(t.pixel("carol@ext.test")) as r:
            assert r.status == 200
    (row,) = await events(relay)
    assert row[2:4] == ("self", "signed_in_ip")


async def test_hits_buffered_at_stop_are_written_before_the_stop_returns(relay, sink):
    await start(relay)
    t = await send_tracked(relay)
    await click_many(t, 30)
    recorder = relay.service.tracker.recorder
    pid = recorder.pid
    await relay.service.tracker.stop()  # at once: hits may still be here or in the child's buffer
    assert recorder.depth == 0 and not alive(pid)
    assert await clicks_written(relay) == 30


@pytest.mark.slow
async def test_the_writer_process_ends_with_a_killed_server_and_outlives_sigterm_to_the_group(tmp_path, db_url, sink):
    """systemd's stop and a terminal's Ctrl-C signal the whole process group: the writer waits for
    the server to close its socket (so it writes what it holds); a SIGKILLed server leaves no
    writer behind."""
    from helpers import base_config
    relay_port = free_port()
    cfg = base_config(db_url=db_url, relay_port=relay_port, upstream_url=sink.url, tmp=tmp_path)
    path = tmp_path / "trackrelay.toml"
    path.write_text(to_toml(cfg))

    def writer_pid(proc: RelayProcess) -> int:
        children = Path(f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = RelayProcess(path, relay_port, tmp_path / "relay.log").start()
        await proc.wait_listening()
        await wait_until(lambda: Path(f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children").read_text().strip(),
                         what="the writer process")
        child = writer_pid(proc)
        await wait_until(lambda: b"tracker_http.writer" in Path(f"/proc/{child}/cmdline").read_bytes(),
                         what="the writer's command")
        if sig == signal.SIGTERM:
            os.kill(child, signal.SIGTERM)  # as systemd does to every process of the unit
            await asyncio.sleep(0.3)
            assert alive(child)
            assert proc.kill(signal.SIGTERM) == 0
        else:
            assert proc.kill(signal.SIGKILL) == -signal.SIGKILL
        await wait_until(lambda: not alive(child), timeout=15, what="the writer to exit")
