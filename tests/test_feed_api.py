"""The activity feed API, the live event stream and signed webhooks."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re

import aiohttp
from aiohttp import web

from helpers import API_TOKENS
from test_crm import call, send
from test_tracker import HTML_MSG, browser


async def start(relay, **sections):
    sections.setdefault("tracking", {})["scanner_window_seconds"] = 0
    await relay.start(**sections)


def urls(data: bytes) -> tuple[str, list[str]]:
    pixel = re.search(rb'src="(http://[^"]+/o/[^"]+\.gif)"', data).group(1).decode()
    return pixel, [u.decode() for u in re.findall(rb'href="(http://[^"]+/c/[^"]+)"', data)]


async def test_feed_shows_status_counts_and_clicks_per_recipient(relay, sink):
    await start(relay)
    await send(relay, ["carol@ext.test", "dave@ext.test"])
    got = {r.rcpt_tos[0]: r.data for r in await sink.wait_for(2)}
    await relay.wait_status({"sent"}, 2)
    pixel, clicks = urls(got["carol@ext.test"])
    async with browser() as s:
        for _ in range(2):
            async with s.get(pixel) as r:
                assert r.status == 200
        async with s.head(pixel) as r:  # a machine open, shown apart
            assert r.status == 200
        async with s.get(clicks[0], allow_redirects=False) as r:
            assert r.status == 302
    await relay.events_written()
    status, feed = await call(relay, "GET", "/messages")
    assert status == 200 and feed["next"] is None
    (msg,) = feed["messages"]
    assert msg["subject"] == "Offer" and msg["from"].endswith("<alice@example.com>") and msg["logged"] is True
    rc = {r["address"]: r for r in msg["recipients"]}
    carol, dave = rc["carol@ext.test"], rc["dave@ext.test"]
    assert carol["status"] == "clicked" and dave["status"] == "sent"
    assert carol["opens"] == 2 and carol["machine_opens"] == 1
    assert carol["first_opened_at"] and carol["last_opened_at"] >= carol["first_opened_at"]
    assert carol["clicks"] == [{"url": "https://example.com/offer?a=1&b=2", "count": 1,
                                "first_clicked_at": carol["clicks"][0]["first_clicked_at"]}]
    assert carol["tracked_opens"] and carol["tracked_clicks"] and isinstance(carol["reasons"], list)
    status, one = await call(relay, "GET", f"/messages/{msg['id']}")
    assert status == 200 and {e["type"] for e in one["events"]} >= {"queued", "sent", "opened", "clicked"}


async def test_feed_paging_tracked_filter_isolation_and_admin(relay, sink):
    await start(relay)
    for i in range(3):
        await send(relay, ["carol@ext.test"], HTML_MSG.replace(b"Subject: Offer", f"Subject: Offer {i}".encode()))
    await send(relay, ["carol@ext.test"], HTML_MSG.replace(b"Subject: Offer", b"X-Track: none\r\nSubject: Untracked"))
    await send(relay, ["carol@ext.test"], user="carl")
    await sink.wait_for(5)
    status, page1 = await call(relay, "GET", "/messages?limit=2")
    assert [m["subject"] for m in page1["messages"]] == ["Untracked", "Offer 2"] and page1["next"]
    status, page2 = await call(relay, "GET", f"/messages?limit=2&cursor={page1['next']}")
    assert [m["subject"] for m in page2["messages"]] == ["Offer 1", "Offer 0"]
    status, tracked = await call(relay, "GET", "/messages?tracked=true")
    assert [m["subject"] for m in tracked["messages"]] == ["Offer 2", "Offer 1", "Offer 0"]
    # Isolation: each user with the other's ids.
    _, carls = await call(relay, "GET", "/messages", user="carl")
    assert [m["subject"] for m in carls["messages"]] == ["Offer"]
    carl_id = carls["messages"][0]["id"]
    assert (await call(relay, "GET", f"/messages/{carl_id}"))[0] == 404
    assert (await call(relay, "GET", f"/messages/{page1['messages'][0]['id']}", user="carl"))[0] == 404
    _, carl_events = await call(relay, "GET", "/events", user="carl")
    assert {e["message"] for e in carl_events["events"]} == {carl_id}
    # The admin sees everybody's.
    _, everything = await call(relay, "GET", "/messages", user="bob")
    assert len(everything["messages"]) == 5
    # Errors are JSON with a message.
    status, body = await call(relay, "GET", "/messages?limit=0")
    assert status == 400 and body["error"]["message"]
    status, body = await call(relay, "GET", "/messages?tracked=maybe")
    assert status == 400
    status, body = await call(relay, "GET", "/messages/abc")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await call(relay, "GET", "/nothing-here")
    assert status == 404 and "error" in body


async def read_sse(resp, n: int, timeout: float = 5.0) -> list[tuple[str, dict]]:
    out = []
    buf = b""
    async def go():
        nonlocal buf
        while len(out) < n:
            chunk = await resp.content.readany()
            if not chunk:
                return
            buf += chunk
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                fields = dict(line.split(": ", 1) for line in block.decode().split("\n") if ": " in line)
                if "data" in fields:
                    out.append((fields["id"], json.loads(fields["data"])))
    await asyncio.wait_for(go(), timeout)
    return out


async def test_event_stream_pushes_opens_at_once_and_resumes_without_gaps(relay, sink):
    await start(relay)
    await send(relay, ["carol@ext.test"])
    (r,) = await sink.wait_for(1)
    await relay.wait_status({"sent"}, 1)
    pixel, clicks = urls(r.data)
    api = f"http://{relay.config.api.listen}/api/v1/events/stream"
    headers = {"Authorization": f"Bearer {API_TOKENS['alice']}"}
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as s:
        async with s.get(api, headers=headers) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            await asyncio.sleep(0.2)
            t0 = loop.time()
            async with browser() as b:
                async with b.get(pixel) as px:
                    assert px.status == 200
            ((first_id, ev),) = await read_sse(resp, 1)
            assert ev["type"] == "opened" and ev["recipient"] == "carol@ext.test"
            assert loop.time() - t0 < 1.0  # the sender learns within a second
        # Events while disconnected are delivered on reconnect with Last-Event-ID, nothing skipped.
        async with browser() as b:
            async with b.get(clicks[1], allow_redirects=False) as c:
                assert c.status == 302
        async with s.get(api, headers=dict(headers, **{"Last-Event-ID": first_id})) as resp:
            got = await read_sse(resp, 1)
            assert [e["type"] for _, e in got] == ["clicked"]
        # Another user's stream never carries alice's events.
        async with s.get(api, headers={"Authorization": f"Bearer {API_TOKENS['carl']}", "Last-Event-ID": "0"}) as resp:
            try:
                got = await read_sse(resp, 1, timeout=1.0)
            except asyncio.TimeoutError:
                got = []
            assert got == []


class Receiver:
    def __init__(self, secret: str):
        self.secret = secret
        self.events: list[dict] = []
        self.fail = 0
        self.bad_signatures = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        sig = request.headers.get("X-Trackrelay-Signature", "")
        parts = dict(p.split("=", 1) for p in sig.split(",") if "=" in p)
        expected = hmac.new(self.secret.encode(), f"{parts.get('t')}.".encode() + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, parts.get("v1", "")):
            self.bad_signatures += 1
            return web.Response(status=400)
        if self.fail > 0:
            self.fail -= 1
            return web.Response(status=500)
        self.events.append(json.loads(body))
        return web.Response(status=204)


async def test_webhooks_signed_retried_and_nothing_lost_across_a_restart(relay, sink):
    receiver = Receiver("hook-secret-0123")
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    hooks = [{"url": f"http://127.0.0.1:{port}/hook", "secret": "hook-secret-0123", "retry_initial_seconds": 0.2}]
    try:
        await start(relay, webhooks=hooks)
        await asyncio.sleep(0.5)  # the webhook's cursor starts now
        await send(relay, ["carol@ext.test"])
        (r,) = await sink.wait_for(1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while {"queued", "sent"} - {e["type"] for e in receiver.events} and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert {"queued", "sent"} <= {e["type"] for e in receiver.events}
        assert receiver.bad_signatures == 0
        # The receiver fails for a while; trackrelay restarts in between.
        receiver.fail = 3
        pixel, _ = urls(r.data)
        async with browser() as b:
            async with b.get(pixel) as px:
                assert px.status == 200
        await asyncio.sleep(0.4)
        await relay.stop()
        await start(relay, webhooks=hooks)
        deadline = loop.time() + 15
        while "opened" not in {e["type"] for e in receiver.events} and loop.time() < deadline:
            await asyncio.sleep(0.05)
        opened = [e for e in receiver.events if e["type"] == "opened"]
        assert len(opened) >= 1 and opened[0]["recipient"] == "carol@ext.test" and opened[0]["user"] == "alice"
        ids = [e["id"] for e in receiver.events]
        assert set(ids) >= {e["id"] for e in (await call(relay, "GET", "/events"))[1]["events"]}
    finally:
        await runner.cleanup()


async def test_cli_feed_prints_the_table_and_follows_new_events(relay, sink, tmp_path):
    import sys
    from helpers import to_toml
    await start(relay)
    await send(relay, ["carol@ext.test"])
    (r,) = await sink.wait_for(1)
    await relay.wait_status({"sent"}, 1)
    cfg = tmp_path / "t.toml"
    cfg.write_text(to_toml(relay.config_dict()))
    out = await asyncio.create_subprocess_exec(sys.executable, "-m", "trackrelay.cli", "-c", str(cfg), "feed",
                                               "--user", "alice", stdout=asyncio.subprocess.PIPE,
                                               stderr=asyncio.subprocess.PIPE)
    stdout, _ = await out.communicate()
    assert out.returncode == 0
    lines = stdout.decode().splitlines()
    assert lines[0].split()[:4] == ["sent", "subject", "recipient", "status"]
    assert "Offer" in lines[1] and "carol@ext.test" in lines[1] and " sent " in lines[1]
    follow = await asyncio.create_subprocess_exec(sys.executable, "-m", "trackrelay.cli", "-c", str(cfg), "feed",
                                                  "--follow", stdout=asyncio.subprocess.PIPE,
                                                  stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.wait_for(follow.stdout.readline(), 15)  # the header: it is running
        await asyncio.sleep(1.0)
        pixel, _ = urls(r.data)
        async with browser() as b:
            async with b.get(pixel) as px:
                assert px.status == 200
        line = b""
        while b"opened" not in line:
            line = await asyncio.wait_for(follow.stdout.readline(), 10)
        assert b"carol@ext.test" in line and b"human" in line
    finally:
        follow.terminate()
        await follow.wait()


async def test_an_open_live_stream_ends_at_stop_and_does_not_hold_it(relay, sink):
    """A browser with the feed open keeps an event stream open; stopping the service ends that
    stream's response at once instead of waiting out aiohttp's 60 s shutdown timeout."""
    await start(relay)
    api = f"http://{relay.config.api.listen}/api/v1/events/stream"
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as s:
        async with s.get(api, headers={"Authorization": f"Bearer {API_TOKENS['alice']}"}) as resp:
            assert resp.status == 200
            assert (await resp.content.readline()).startswith(b"retry:")
            t0 = loop.time()
            await asyncio.wait_for(relay.stop(), 30)
            stopped = loop.time() - t0
            rest = await asyncio.wait_for(resp.content.read(), 5)  # the response is complete
    assert stopped < 3.0, stopped
    assert b"data:" not in rest
