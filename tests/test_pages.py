"""The pages: sign-in, the feed with live updates, a message's events, a contact's timeline.

Over plain HTTP for the rules (sign-in required, CSRF, rate limit, escaping, headers), and in real
headless Chromium for what a salesperson does. Screenshots of every page, desktop and phone width,
are written to the test's temporary folder; with ``TRACKRELAY_SCREENSHOTS=docs`` (regenerating them
on purpose) to docs/screenshots/ instead.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import aiohttp
import pytest

from helpers import PASSWORD
from test_crm import send, wait_logged, with_attachment
from test_tracker import HTML_MSG

DOC_SHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


@pytest.fixture
def shots(tmp_path) -> Path:
    """Where screenshots go: a temporary folder, or docs/screenshots/ when regenerated on purpose."""
    folder = DOC_SHOTS if os.environ.get("TRACKRELAY_SCREENSHOTS") == "docs" else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def start(relay, **sections):
    sections.setdefault("tracking", {})["scanner_window_seconds"] = 0
    await relay.start(**sections)


def base(relay) -> str:
    return f"http://{relay.config.api.listen}"


async def sign_in(s: aiohttp.ClientSession, relay, user="alice", password=PASSWORD) -> aiohttp.ClientResponse:
    async with s.get(base(relay) + "/login") as r:
        nonce = re.search(r'name="csrf" value="([^"]+)"', await r.text()).group(1)
    return await s.post(base(relay) + "/login", data={"username": user, "password": password, "csrf": nonce,
                                                      "next": "/"}, allow_redirects=False)


def local_session(addr="127.0.0.3") -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                 connector=aiohttp.TCPConnector(local_addr=(addr, 0)))


async def test_pages_need_sign_in_and_the_cookie_is_httponly_samesite(relay, sink):
    await start(relay)
    async with local_session() as s:
        async with s.get(base(relay) + "/", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"].startswith("/login")
        r = await sign_in(s, relay)
        assert r.status == 303
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        async with s.get(base(relay) + "/") as r:
            assert r.status == 200 and "Activity" in await r.text()
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]


async def test_sign_in_is_rate_limited(relay, sink):
    await start(relay)
    async with local_session() as s:
        for _ in range(5):
            r = await sign_in(s, relay, password="wrong")
            assert r.status == 401
        r = await sign_in(s, relay)  # even the right password waits now
        assert r.status == 429


async def test_state_changing_forms_refuse_cross_site_requests(relay, sink):
    await start(relay)
    await send(relay, ["carol@ext.test"])
    await sink.wait_for(1)
    (lid,) = (await wait_logged(relay))[0]
    async with local_session() as s:
        await sign_in(s, relay)
        async with s.post(base(relay) + f"/logged-emails/{lid}/delete", data={"back": "/"},
                          allow_redirects=False) as r:
            assert r.status == 403
        async with s.post(base(relay) + f"/logged-emails/{lid}/pin", data={"csrf": "forged", "back": "/"},
                          allow_redirects=False) as r:
            assert r.status == 403
    assert len(await relay.rows("SELECT id FROM logged_emails WHERE pinned = :f", f=False)) == 1


async def test_subjects_and_user_agents_are_escaped_and_bodies_sandboxed(relay, sink):
    await start(relay)
    evil = b"<script>alert('subject')</script>"
    await send(relay, ["carol@ext.test"], HTML_MSG.replace(b"Subject: Offer", b"Subject: " + evil)
               .replace(b"<p>Hi Carol", b"<script>alert('body')</script><p>Hi Carol"))
    (r,) = await sink.wait_for(1)
    await relay.wait_status({"sent"}, 1)
    await wait_logged(relay)
    pixel = re.search(rb'src="(http://[^"]+/o/[^"]+\.gif)"', r.data).group(1).decode()
    async with aiohttp.ClientSession(headers={"User-Agent": "<script>alert('ua')</script>"}) as b:
        async with b.get(pixel) as px:
            assert px.status == 200
    await relay.events_written()
    (mid,) = (await relay.rows("SELECT id FROM messages"))[0]
    (lid,) = (await relay.rows("SELECT id FROM logged_emails"))[0]
    async with local_session() as s:
        await sign_in(s, relay)
        for path in ("/", f"/messages/{mid}", "/contacts/carol@ext.test"):
            async with s.get(base(relay) + path) as resp:
                page = await resp.text()
                assert "<script>alert" not in page, path
        async with s.get(base(relay) + f"/messages/{mid}") as resp:
            assert "&lt;script&gt;alert(&#39;ua&#39;)&lt;/script&gt;" in await resp.text()
        async with s.get(base(relay) + f"/logged-emails/{lid}/body") as resp:
            assert resp.headers["Content-Security-Policy"].startswith("sandbox;")
            assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        async with s.get(base(relay) + "/contacts/carol@ext.test") as resp:
            assert 'sandbox=""' in await resp.text()


@pytest.mark.browser
async def test_chromium_sign_in_live_open_pin_delete_download_and_screenshots(relay, sink, shots):
    from browser import chromium_page
    await start(relay)
    await send(relay, ["carol@ext.test", "dave@ext.test"])
    msg, data = with_attachment(4000, "pricing.pdf")
    await send(relay, ["carol@ext.test"], msg)
    got = await sink.wait_for(3)
    await relay.wait_status({"sent"}, 3)
    await wait_logged(relay, 2)
    offer = [r for r in got if r.rcpt_tos == ["carol@ext.test"] and b"Offer" in r.data][0]
    pixel = re.search(rb'src="(http://[^"]+/o/[^"]+\.gif)"', offer.data).group(1).decode()
    async with chromium_page() as page:
        await page.goto(base(relay) + "/")
        assert "/login" in page.url
        await page.fill("input[name=username]", "alice")
        await page.fill("input[name=password]", PASSWORD)
        await page.click("button[type=submit]")
        await page.wait_for_url(base(relay) + "/")
        row = page.locator("tr[data-recipient='carol@ext.test']").last
        assert await row.locator(".status").inner_text() == "sent"
        await page.wait_for_function("document.documentElement.dataset.live === '1'")
        await asyncio.sleep(0.5)  # the stream is connected
        # The recipient opens it somewhere else: the row turns "opened" without a reload.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.5", 0)),
                                         headers={"User-Agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) "
                                                  "AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148"}) as b:
            async with b.get(pixel) as px:
                assert px.status == 200
        await row.locator(".status", has_text="opened").wait_for(timeout=5000)
        assert await page.locator(".toast").first.inner_text() == "carol@ext.test opened \u201cOffer\u201d"
        await page.set_viewport_size({"width": 1280, "height": 800})
        await page.screenshot(path=str(shots / "feed.png"), full_page=True)
        await page.set_viewport_size({"width": 390, "height": 844})
        await page.screenshot(path=str(shots / "feed-phone.png"), full_page=True)
        await page.set_viewport_size({"width": 1280, "height": 800})

        # The contact's timeline: expand, download an attachment, pin, delete.
        await page.goto(base(relay) + "/contacts/carol@ext.test")
        cards = page.locator("article.logged")
        assert await cards.count() == 2
        await cards.nth(0).locator("summary").click()
        async with page.expect_download() as dl:
            await page.click("text=pricing.pdf")
        download = await dl.value
        assert Path(await download.path()).read_bytes() == data
        await cards.nth(1).locator("summary").click()
        await cards.nth(1).locator("button", has_text="Pin").click()
        await page.wait_for_load_state()
        assert await page.locator("article.logged").nth(0).locator(".subject").inner_text() == "Offer"
        assert await page.locator("article.logged.pinned").count() == 1
        await page.locator("article.logged").nth(0).locator("summary").click()
        await page.screenshot(path=str(shots / "timeline.png"), full_page=True)
        await page.locator("article.logged").nth(1).locator("summary").click()
        await page.locator("article.logged").nth(1).locator("button", has_text="Delete").click()
        await page.wait_for_load_state()
        assert await page.locator("article.logged").count() == 1
    assert [s for (s,) in await relay.rows("SELECT subject FROM logged_emails ORDER BY id")] == ["Offer"]
