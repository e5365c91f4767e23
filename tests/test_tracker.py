"""The tracker over real HTTP: pixel, signed redirects, classification, buffered recording, events API."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time

import aiohttp
import pytest

from helpers import API_TOKENS, client, wait_until
from tracker_http.public import GIF
from core.links import Keyring, click_url

SENDER_IP = "127.0.0.2"  # the mail is submitted from here; the reader opens from 127.0.0.1

HTML_MSG = (b"From: Alice <alice@example.com>\r\nTo: carol@ext.test\r\nSubject: Offer\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            b"<html><body><p>Hi Carol, see <a href=\"https://example.com/offer?a=1&amp;b=2\">the offer</a> "
            b"and <a href=\"https://example.com/pricing\">pricing</a>.</p></body></html>\r\n")


class Tracked:
    """A message sent through the relay and delivered; its copies' pixel and click URLs."""

    def __init__(self, relay, data_by_rcpt: dict[str, bytes]):
        self.relay = relay
        self.data = data_by_rcpt

    def pixel(self, rcpt: str) -> str:
        return re.search(rb'src="(http://[^"]+/o/[^"]+\.gif)"', self.data[rcpt]).group(1).decode()

    def clicks(self, rcpt: str) -> list[str]:
        return [u.decode() for u in re.findall(rb'href="(http://[^"]+/c/[^"]+)"', self.data[rcpt])]


async def send_tracked(relay, rcpts=("carol@ext.test",), source=SENDER_IP, user="alice", msg=HTML_MSG) -> Tracked:
    c = await client(relay.port, user=user, source=source)
    frm = f"{user}@example.com"
    await c.sendmail(frm, list(rcpts), msg.replace(b"alice@example.com", frm.encode()))
    await c.quit()
    got = await relay.sink.wait_for(len(relay.sink.received) + len(rcpts))
    await relay.wait_status({"sent"}, len(rcpts))
    return Tracked(relay, {r.rcpt_tos[0]: r.data for r in got})


async def events(relay, timeout=10.0, want=1):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        rows = await relay.rows(
            "SELECT e.type, r.address, e.classification, e.reason, e.url, e.ip, e.first, e.inferred, e.client "
            "FROM events e JOIN recipients r ON r.id = e.recipient_pk "
            "WHERE e.type IN ('opened', 'clicked') ORDER BY e.id")
        if len(rows) >= want or loop.time() > deadline:
            return rows
        await asyncio.sleep(0.05)


BROWSER_UA = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/120.0 Safari/537.36")


def browser() -> aiohttp.ClientSession:
    """A client that looks like a reader's browser (aiohttp's own agent is a known scanner)."""
    return aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA})


def public(relay) -> str:
    return "http://" + relay.config.tracker.listen


def api(relay) -> str:
    return "http://" + relay.config.api.listen


async def start(relay, **sections):
    sections.setdefault("tracking", {}).setdefault("scanner_window_seconds", 0)
    await relay.start(**sections)


async def start_in_process(relay, **sections):
    """The recorder in the serving process (``tracker.writer_process = false``): for the tests that
    watch or patch its internals. The writer process runs the same Recorder (tests/test_writer.py)."""
    sections.setdefault("tracker", {})["writer_process"] = False
    await start(relay, **sections)


async def test_pixel_records_a_human_open_for_exactly_that_recipient(relay, sink):
    await start(relay)
    t = await send_tracked(relay, ("carol@ext.test", "dave@ext.test"))
    async with browser() as s:
        async with s.get(t.pixel("carol@ext.test"), headers={"User-Agent": "Mozilla/5.0 (Windows NT 10.0; "
                         "Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"}) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/gif"
            assert r.headers["Cache-Control"] == "no-store, no-cache, must-revalidate, private, max-age=0"
            assert await r.read() == GIF and len(GIF) == 43
    (row,) = await events(relay)
    assert row[:4] == ("opened", "carol@ext.test", "human", None)
    assert row[5] == "127.0.0.0"  # truncated per privacy.store_ip
    assert row[6] in (True, 1) and row[8] == "Chrome/Windows"


async def test_user_agent_parser_is_built_before_the_tracker_listens(relay, sink, monkeypatch):
    # Built lazily at the first event instead, its ~130 ms would stall the event loop while serving.
    import ua_parser
    monkeypatch.delitem(vars(ua_parser), "parser", raising=False)  # as in a fresh process
    await start_in_process(relay)
    assert "parser" in vars(ua_parser)


async def test_unknown_pixel_token_gets_the_gif_and_records_nothing(relay, sink):
    await start(relay)
    async with browser() as s:
        async with s.get(public(relay) + "/o/UNKNOWNunknownUNKNOWNunknown.gif") as r:
            assert r.status == 200 and await r.read() == GIF
    recorder = relay.service.tracker.recorder
    await wait_until(lambda: recorder.stats.unknown_tokens, timeout=10, what="the hit handled")
    assert recorder.stats.unknown_tokens == 1 and recorder.depth == 0
    assert await events(relay, timeout=0.3) == []


async def test_click_redirects_to_the_original_and_records_click_with_inferred_open(relay, sink):
    await start(relay)
    t = await send_tracked(relay)
    url = t.clicks("carol@ext.test")[0]
    async with browser() as s:
        async with s.get(url, allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Location"] == "https://example.com/offer?a=1&b=2"
            assert r.headers["Referrer-Policy"] == "no-referrer"
    rows = await events(relay, want=2)
    assert [(r[0], r[2], r[4], bool(r[6]), bool(r[7])) for r in rows] == [
        ("opened", "human", None, True, True),
        ("clicked", "human", "https://example.com/offer?a=1&b=2", True, False)]


@pytest.mark.parametrize("mangle", ["tamper_target", "tamper_sig", "other_key", "javascript", "crlf", "truncated",
                                    "non_ascii_index", "non_ascii_target", "control_char"])
async def test_bad_click_urls_get_404_never_a_redirect(relay, sink, mangle):
    await start(relay)
    t = await send_tracked(relay)
    good = t.clicks("carol@ext.test")[0]
    base, rest = good.split("/c/")
    kid, token, idx, target, sig = rest.split(".")
    if mangle == "tamper_target":
        bad = f"{base}/c/{kid}.{token}.{idx}.{target[:-2] + 'xx'}.{sig}"
    elif mangle == "tamper_sig":
        bad = f"{base}/c/{kid}.{token}.{idx}.{target}.{sig[:-1] + ('A' if sig[-1] != 'A' else 'B')}"
    elif mangle == "other_key":
        bad = click_url(base, Keyring.from_strings(["attacker-key-0123456789"]), token, 0, "https://evil.example/")
    elif mangle == "javascript":
        bad = click_url(base, Keyring.from_strings(["test-key-0123456789abcdef"]), token, 0, "javascript:alert(1)")
    elif mangle == "crlf":
        bad = click_url(base, Keyring.from_strings(["test-key-0123456789abcdef"]), token, 0,
                        "https://example.com/\r\nSet-Cookie: x=1")
    elif mangle == "control_char":  # signed, http(s), no CR/LF/NUL: still no header value
        bad = click_url(base, Keyring.from_strings(["test-key-0123456789abcdef"]), token, 0,
                        "https://example.com/\x01x")
    elif mangle == "non_ascii_index":  # "²" passes str.isdigit
        bad = f"{base}/c/{kid}.{token}.\u00b2.{target}.{sig}"
    elif mangle == "non_ascii_target":
        bad = f"{base}/c/{kid}.{token}.{idx}.{target}\u00e9.{sig}"
    else:
        bad = good[:-5]
    async with browser() as s:
        async with s.get(bad, allow_redirects=False) as r:
            assert r.status == 404 and "Location" not in r.headers
    await asyncio.sleep(0.4)
    assert await events(relay, timeout=0.2) == []


async def test_nothing_of_the_api_answers_on_the_public_listener(relay, sink):
    await start(relay)
    async with browser() as s:
        for path in ("/api/v1/events", "/metrics", "/api/v1/openapi.json", "/", "/login"):
            async with s.get(public(relay) + path,
                             headers={"Authorization": f"Bearer {API_TOKENS['bob']}"}) as r:
                assert r.status == 404, path
        async with s.get(public(relay) + "/healthz") as r:
            assert r.status == 200


async def test_head_request_is_machine(relay, sink):
    await start(relay)
    t = await send_tracked(relay)
    async with browser() as s:
        async with s.head(t.clicks("carol@ext.test")[0], allow_redirects=False) as r:
            assert r.status == 302
    (row,) = await events(relay)
    assert row[:4] == ("clicked", "carol@ext.test", "machine", "head_request")


async def test_click_within_scanner_window_is_machine(relay, sink):
    await relay.start(tracking={"scanner_window_seconds": 60})
    t = await send_tracked(relay)
    async with browser() as s:
        async with s.get(t.clicks("carol@ext.test")[0], allow_redirects=False) as r:
            assert r.status == 302
    (row,) = await events(relay)
    assert row[2:4] == ("machine", "scanner_window")


async def test_burst_of_clicks_on_several_links_is_machine(relay, sink):
    await start(relay)
    t = await send_tracked(relay)
    async with browser() as s:
        for url in t.clicks("carol@ext.test"):
            async with s.get(url, allow_redirects=False) as r:
                assert r.status == 302
    rows = await events(relay, want=3)
    clicks = [r for r in rows if r[0] == "clicked"]
    assert clicks[-1][2:4] == ("machine", "click_burst")


async def test_apple_egress_address_via_trusted_proxy_is_machine(relay, sink):
    await start(relay, tracker={"trusted_proxies": ["127.0.0.1"]})
    t = await send_tracked(relay)
    async with browser() as s:
        async with s.get(t.pixel("carol@ext.test"), headers={"X-Forwarded-For": "203.0.113.9, 17.58.100.4"}) as r:
            assert r.status == 200
    (row,) = await events(relay)
    assert row[2:4] == ("machine", "apple_privacy_proxy") and row[5] == "17.58.100.0"


async def test_forged_forwarded_for_from_untrusted_peer_is_ignored(relay, sink):
    await start(relay)  # no trusted proxies
    t = await send_tracked(relay)
    async with browser() as s:
        async with s.get(t.pixel("carol@ext.test"), headers={"X-Forwarded-For": "17.58.100.4"}) as r:
            assert r.status == 200
    (row,) = await events(relay)
    assert row[2] == "human" and row[5] == "127.0.0.0"


async def test_open_from_the_submitting_address_is_self(relay, sink):
    await start(relay)
    t = await send_tracked(relay, source="127.0.0.1")
    async with browser() as s:
        async with s.get(t.pixel("carol@ext.test")) as r:
            assert r.status == 200
    (row,) = await events(relay)
    assert row[2:4] == ("self", "sender_ip")


async def test_gmail_image_proxy_is_a_human_open_from_gmail(relay, sink):
    await start(relay)
    t = await send_tracked(relay)
    ua = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
    async with browser() as s:
        async with s.get(t.pixel("carol@ext.test"), headers={"User-Agent": ua}) as r:
            assert r.status == 200
    (row,) = await events(relay)
    assert row[2] == "human" and row[8] == "Gmail"


async def test_database_locked_clicks_still_redirect_and_events_are_written_once_after(relay, sink, db_url):
    await start(relay)
    t = await send_tracked(relay)
    url = t.clicks("carol@ext.test")[1]
    release = threading.Event()
    locked = threading.Event()
    pg_lock = None
    if db_url.startswith("sqlite"):
        path = db_url.split(":///", 1)[1]

        def hold():
            con = sqlite3.connect(path, timeout=30)
            con.execute("BEGIN EXCLUSIVE")
            locked.set()
            release.wait(30)
            con.rollback()
            con.close()

        holder = threading.Thread(target=hold)
        holder.start()
        locked.wait(10)
    else:
        import asyncpg
        from conftest import _pg_dsn, pg_test_url
        pg_lock = await asyncpg.connect(_pg_dsn(pg_test_url()))
        tr = pg_lock.transaction()
        await tr.start()
        await pg_lock.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
    try:
        async with browser() as s:
            for i in range(100):
                async with s.get(url, allow_redirects=False, headers={"User-Agent": f"reader {i}"}) as r:
                    assert r.status == 302 and r.headers["Location"] == "https://example.com/pricing"
        await asyncio.sleep(0.5)
        assert relay.service.tracker.recorder.depth > 0  # nothing could be written yet
    finally:
        if pg_lock is not None:
            await tr.rollback()
            await pg_lock.close()
        else:
            release.set()
            holder.join()
    rows = await events(relay, timeout=40, want=101)
    clicks = [r for r in rows if r[0] == "clicked"]
    assert len(clicks) == 100  # exactly once each
    assert len(rows) == 101  # plus the one inferred open


async def test_a_batch_written_but_reported_failed_is_retried_without_duplicates(relay, sink):
    """The database commits a batch but the answer is lost (a dropped connection): the recorder
    keeps the batch and writes it again; the events' idempotency keys make the retry a no-op."""
    await start_in_process(relay)
    t = await send_tracked(relay)
    recorder = relay.service.tracker.recorder
    real_write, failed = recorder._write, []

    async def write_then_lose_the_answer(batch):
        written = await real_write(batch)
        if not failed:
            failed.append(len(batch))
            raise ConnectionResetError("the commit's answer was lost")
        return written

    recorder._write = write_then_lose_the_answer
    async with browser() as s:
        for url in t.clicks("carol@ext.test"):
            async with s.get(url, allow_redirects=False) as r:
                assert r.status == 302
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while (recorder.depth or not failed) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    assert failed and recorder.depth == 0 and recorder.stats.failures == 1
    rows = await events(relay, want=3)
    assert sorted((r[0], r[4]) for r in rows) == [
        ("clicked", "https://example.com/offer?a=1&b=2"), ("clicked", "https://example.com/pricing"),
        ("opened", None)]  # each click once, and the open inferred from the first


def count_history_reads(monkeypatch) -> list[int]:
    """The recipients whose human history the recorders ask of the database, as they ask."""
    from storage import events as ev
    asked: list[int] = []
    real_sqlite, real_sa = ev.human_history_sqlite, ev.human_history

    def sqlite_reads(db, pks):
        asked.extend(pks)
        return real_sqlite(db, pks)

    async def sa_reads(session, pks):
        asked.extend(pks)
        return await real_sa(session, pks)

    monkeypatch.setattr(ev, "human_history_sqlite", sqlite_reads)
    monkeypatch.setattr(ev, "human_history", sa_reads)
    return asked


async def test_a_recipients_history_is_read_once_then_kept_in_memory(relay, sink, monkeypatch):
    """Most recipients open and never click: their history is asked of the database once, not on
    every batch again, and this process's own writes keep it current."""
    await start_in_process(relay)
    t = await send_tracked(relay)
    asked = count_history_reads(monkeypatch)
    async with browser() as s:
        for written in (1, 2):  # each open its own batch
            async with s.get(t.pixel("carol@ext.test")) as r:
                assert r.status == 200
            assert len(await events(relay, want=written)) == written
        async with s.get(t.clicks("carol@ext.test")[0], allow_redirects=False) as r:
            assert r.status == 302
    rows = await events(relay, want=3)
    assert [(r[0], r[2], bool(r[6]), bool(r[7])) for r in rows] == [
        ("opened", "human", True, False), ("opened", "human", False, False),
        ("clicked", "human", True, False)]  # no open inferred: the first one is remembered
    assert len(asked) == 1


async def test_history_read_from_the_database_is_trusted_for_history_ttl_only(relay, sink, monkeypatch):
    """Another tracker process may write a recipient's human open meanwhile: once HISTORY_TTL has
    passed the database is asked again, and a click infers no second open."""
    from tracker_http import recorder as recorder_module
    monkeypatch.setattr(recorder_module, "HISTORY_TTL", 0.5)
    await start_in_process(relay)
    t = await send_tracked(relay)
    asked = count_history_reads(monkeypatch)
    ours = relay.service.tracker.recorder
    async with browser() as s:
        async with s.head(t.pixel("carol@ext.test")) as r:  # a machine's open: nothing human yet
            assert r.status == 200
        await events(relay, want=1)
        other = recorder_module.Recorder(ours.config, ours.sessionmaker, ours.apple)  # another process
        token = t.pixel("carol@ext.test").rsplit("/o/", 1)[1][:-len(".gif")]
        other.add(("open", token, "GET", "127.0.0.1", BROWSER_UA, time.time(), None, None))
        assert await other.flush_once()
        await asyncio.sleep(0.6)  # our memory of carol's history is stale now
        async with s.get(t.clicks("carol@ext.test")[0], allow_redirects=False) as r:
            assert r.status == 302
    rows = await events(relay, want=3)
    assert [(r[0], r[2], r[3], bool(r[6]), bool(r[7])) for r in rows] == [
        ("opened", "machine", "head_request", False, False), ("opened", "human", None, True, False),
        ("clicked", "human", None, True, False)]
    assert len(asked) == 3  # ours before the HEAD, the other's, ours again before the click


async def test_under_steady_load_events_are_written_a_batch_per_flush_interval(relay, sink, monkeypatch):
    """Hits that come in while a batch is written wait for the next interval: at most a batch per
    FLUSH_INTERVAL (or per BATCH_MAX hits), not small batches back to back, each with its own
    commit, token look-up and contact updates. Every hit is still written."""
    from tracker_http import recorder as recorder_module
    interval = 0.2
    monkeypatch.setattr(recorder_module, "FLUSH_INTERVAL", interval)
    await start_in_process(relay)
    t = await send_tracked(relay)
    rec = relay.service.tracker.recorder
    before, sent = rec.stats.batches, 0
    async with browser() as s:
        t0 = time.monotonic()

        async def reader():
            nonlocal sent
            while time.monotonic() - t0 < 1.0:
                async with s.get(t.pixel("carol@ext.test")) as r:
                    assert r.status == 200
                sent += 1

        await asyncio.gather(*(reader() for _ in range(4)))
        elapsed = time.monotonic() - t0
    assert len(await events(relay, want=sent)) == sent
    batches = rec.stats.batches - before
    assert sent > 4 * elapsed / interval  # enough load to batch at all
    assert batches <= elapsed / interval + sent // recorder_module.BATCH_MAX + 2, (batches, sent)


async def test_hits_left_after_a_full_batch_wait_for_the_next_interval(relay, sink, monkeypatch):
    """A full batch's worth of hits arriving during a write wakes the recorder for that full batch
    only: the remainder waits FLUSH_INTERVAL instead of going straight after as a small batch."""
    from tracker_http import recorder as recorder_module
    interval = 0.3
    monkeypatch.setattr(recorder_module, "FLUSH_INTERVAL", interval)
    await start_in_process(relay)
    t = await send_tracked(relay)
    rec = relay.service.tracker.recorder
    write, calls = rec._write, []

    async def write_while_hits_arrive(batch):
        if not calls:  # hits come in while the first batch is written: a full batch and 200 more
            for i in range(recorder_module.BATCH_MAX + 200):
                rec.add(batch[0][:5] + (batch[0][5] + i * 1e-6,) + batch[0][6:])
        started = time.monotonic()
        n = await write(batch)
        calls.append((len(batch), started, time.monotonic()))
        return n

    monkeypatch.setattr(rec, "_write", write_while_hits_arrive)
    async with browser() as s:
        async with s.get(t.pixel("carol@ext.test")) as r:
            assert r.status == 200
    assert len(await events(relay, want=recorder_module.BATCH_MAX + 201)) == recorder_module.BATCH_MAX + 201
    assert [c[0] for c in calls] == [1, recorder_module.BATCH_MAX, 200]
    assert calls[2][1] - calls[1][2] >= interval * 0.9, calls


async def test_events_api_shows_own_events_only_and_admin_sees_all(relay, sink):
    await start(relay)
    t_alice = await send_tracked(relay, user="alice")
    async with browser() as s:
        async with s.get(t_alice.pixel("carol@ext.test")) as r:
            assert r.status == 200
        await events(relay)
        await asyncio.sleep(0.2)

        async def get(user, query=""):
            async with s.get(api(relay) + "/api/v1/events" + query,
                             headers={"Authorization": f"Bearer {API_TOKENS[user]}"}) as r:
                return r.status, await r.json()

        status, body = await get("alice")
        assert status == 200
        types = [e["type"] for e in body["events"]]
        assert {"queued", "sent", "opened"} <= set(types)
        opened = [e for e in body["events"] if e["type"] == "opened"][0]
        assert opened["recipient"] == "carol@ext.test" and opened["classification"] == "human"
        assert opened["message_id"] and opened["at"].endswith("Z") and opened["ip"] == "127.0.0.0"
        assert set(opened) >= {"id", "type", "at", "message", "message_id", "recipient", "url", "user_agent",
                               "ip", "client", "classification", "reason", "first", "inferred"}
        status, body = await get("carl")
        assert status == 200 and body["events"] == []
        status, body = await get("bob")  # admin
        assert {e["type"] for e in body["events"]} >= {"opened"}
        # Paging with after= and limit=
        status, page = await get("alice", "?limit=1")
        assert len(page["events"]) == 1 and page["next"]
        status, page2 = await get("alice", f"?after={page['next']}&limit=100")
        assert page2["events"][0]["id"] > page["events"][0]["id"]
        async with s.get(api(relay) + "/api/v1/events") as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
        async with s.get(api(relay) + "/api/v1/events?limit=abc",
                         headers={"Authorization": f"Bearer {API_TOKENS['alice']}"}) as r:
            assert r.status == 400 and "limit" in (await r.json())["error"]["message"]
        async with s.get(api(relay) + "/metrics") as r:
            text = await r.text()
            assert 'trackrelay_tracker_requests_total{route="pixel"} 1' in text
            assert "trackrelay_events_dropped_total 0" in text
            assert re.search(r"^trackrelay_event_batches_total [1-9]", text, re.M)


@pytest.mark.browser
async def test_chromium_renders_the_copy_fetches_the_pixel_and_clicks_through(relay, sink):
    from aiohttp import web

    from browser import chromium_page

    landed = []

    async def landing(request):
        landed.append(str(request.rel_url))
        return web.Response(text="<html><body><h1>Landed</h1></body></html>", content_type="text/html")

    target_app = web.Application()
    target_app.router.add_get("/landing", landing)
    runner = web.AppRunner(target_app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    target_port = runner.addresses[0][1]
    try:
        await start(relay)
        msg = HTML_MSG.replace(b"https://example.com/offer?a=1&amp;b=2",
                               f"http://127.0.0.1:{target_port}/landing?a=1&amp;b=%C5%BC".encode())
        t = await send_tracked(relay, ("carol@ext.test", "dave@ext.test"), msg=msg)
        html = t.data["carol@ext.test"].split(b"\r\n\r\n", 1)[1].decode()
        async with chromium_page() as page:
            await page.set_content(html, wait_until="networkidle")
            (row,) = await events(relay)
            assert row[:3] == ("opened", "carol@ext.test", "human")
            async with page.expect_navigation(url=f"http://127.0.0.1:{target_port}/landing?a=1&b=%C5%BC"):
                await page.click("text=the offer")
            assert await page.inner_text("h1") == "Landed"
        assert landed == ["/landing?a=1&b=%C5%BC"]
        rows = await events(relay, want=2)
        clicked = [r for r in rows if r[0] == "clicked"]
        assert [(r[1], r[2], r[4]) for r in clicked] == [
            ("carol@ext.test", "human", f"http://127.0.0.1:{target_port}/landing?a=1&b=%C5%BC")]
        assert all(r[1] == "carol@ext.test" for r in rows)  # dave's copy was never opened
    finally:
        await runner.cleanup()


async def test_refresh_apple_ranges_command_replaces_the_shipped_list(tmp_path):
    from aiohttp import web

    from tracker_http.netaddr import apple_ranges_path
    from trackrelay.cli import main
    from core.config import from_dict

    async def csv(request):
        return web.Response(text="104.28.0.0/24,US,US-CA,Los Angeles,\n2a02:26f7:b3c0:4000::/64,DE,DE-BE,Berlin,\nbogus\n")

    app = web.Application()
    app.router.add_get("/egress.csv", csv)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[storage]\nurl = "sqlite+aiosqlite:///{tmp_path}/t.db"\n[relay]\nhostname = "h.example"\n')
    try:
        rc = await asyncio.to_thread(main, ["-c", str(cfg), "tracker", "refresh-apple-ranges",
                                            "--url", f"http://127.0.0.1:{port}/egress.csv"])
    finally:
        await runner.cleanup()
    assert rc == 0
    path = apple_ranges_path(from_dict({"storage": {"url": f"sqlite+aiosqlite:///{tmp_path}/t.db"}}, "x", {}))
    assert path == tmp_path / "apple_mpp_ranges.txt"
    from tracker_http.netaddr import RangeSet
    ranges = RangeSet.from_file(path)
    assert "104.28.0.77" in ranges and "2a02:26f7:b3c0:4000::1" in ranges and "17.1.1.1" not in ranges


def test_ip_storage_and_forwarded_for_rules():
    from tracker_http.netaddr import client_ip, networks, stored_ip
    assert stored_ip("203.0.113.77", "truncated") == "203.0.113.0"
    assert stored_ip("2001:db8:1234:5678::1", "truncated") == "2001:db8:1234::"
    assert stored_ip("203.0.113.77", "full") == "203.0.113.77"
    assert stored_ip("203.0.113.77", "none") is None
    trusted = networks(["10.0.0.0/8"])
    assert client_ip("10.0.0.5", "198.51.100.7, 10.0.0.9", trusted) == "198.51.100.7"
    assert client_ip("198.51.100.1", "1.2.3.4", trusted) == "198.51.100.1"  # untrusted peer: ignored
    assert client_ip("10.0.0.5", "garbage", trusted) == "10.0.0.5"


async def test_retention_erases_raw_ip_and_user_agent_of_old_events(relay, sink):
    await start(relay, privacy={"event_retention_days": 1})
    t = await send_tracked(relay)
    async with browser() as s:
        async with s.get(t.pixel("carol@ext.test")) as r:
            assert r.status == 200
    await events(relay)
    from sqlalchemy import text
    async with relay.service.engine.begin() as conn:
        await conn.execute(text("UPDATE events SET at = :old WHERE type = 'opened'"),
                           {"old": __import__("datetime").datetime(2020, 1, 1)})
    erased = await relay.service.privacy.erase_old_event_data()
    assert erased == 1
    rows = await relay.rows("SELECT ip, user_agent, classification FROM events WHERE type = 'opened'")
    assert rows == [(None, None, "human")]
