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


# -- the pages a salesperson opens every morning (issue 23) -----------------------------------------

IPHONE_UA = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
             "Mobile/15E148")
CARL_MSG = HTML_MSG.replace(b"Subject: Offer", b"Subject: Carl note").replace(b"To: carol@ext.test",
                                                                                b"To: Erin Evans <erin@ext.test>")
NAMED_MSG = HTML_MSG.replace(b"To: carol@ext.test", b"To: Carol Closer <carol@ext.test>, Dave Decider <dave@ext.test>")


async def hit(url: str, ip: str = "127.0.0.5", ua: str = IPHONE_UA, method: str = "GET") -> int:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(ip, 0)),
                                     headers={"User-Agent": ua}) as b:
        async with b.request(method, url, allow_redirects=False) as r:
            return r.status


async def seed(relay, sink):
    """alice's Offer to Carol and Dave (Carol opens, clicks; a HEAD on Dave's pixel; alice opens her
    own copy from her address) and carl's note to Erin. Returns (alice's message id, carl's)."""
    await send(relay, ["carol@ext.test", "dave@ext.test"], NAMED_MSG)
    await send(relay, ["erin@ext.test"], CARL_MSG, user="carl")
    got = await sink.wait_for(3)
    await relay.wait_status({"sent"}, 3)
    await wait_logged(relay, 2)
    copy = {r.rcpt_tos[0]: r.data for r in got}
    pixel = {k: re.search(rb'src="(http://[^"]+/o/[^"]+\.gif)"', v).group(1).decode() for k, v in copy.items()}
    click = re.findall(rb'href="(http://[^"]+/c/[^"]+)"', copy["carol@ext.test"])[0].decode()
    assert await hit(pixel["carol@ext.test"]) == 200
    await asyncio.sleep(2.5)  # not a click burst
    assert await hit(click) == 302
    assert await hit(pixel["dave@ext.test"], method="HEAD") == 200
    assert await hit(pixel["carol@ext.test"], ip="127.0.0.2") == 200  # alice, from her own address
    await relay.events_written()
    ids = dict(await relay.rows("SELECT \"user\", id FROM messages WHERE kind = 'mail'"))
    return ids["alice"], ids["carl"]


def figure(page: str, period: str, fig: str, col: str = "cur") -> str:
    section = page.split(f'data-period="{period}"', 1)[1].split("data-period=", 1)[0]
    row = section.split(f'data-fig="{fig}"', 1)[1].split("</tr>", 1)[0]
    return re.search(rf'class="{col}"[^>]*>([^<]*)<', row).group(1).strip()


def pct(n: int, base: int) -> str:
    return f"{n / base * 100:.0f} %" if base else "—"


async def test_dashboard_figures_equal_the_api_and_each_user_sees_only_their_own_mail(relay, sink):
    from helpers import API_TOKENS
    await start(relay)
    alice_mid, carl_mid = await seed(relay, sink)
    api = base(relay) + "/api/v1/messages"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_TOKENS['alice']}"}) as s:
        async with s.get(api) as r:
            mine = (await r.json())["messages"]
    assert [m["id"] for m in mine] == [alice_mid]
    copies = [r for m in mine for r in m["recipients"]]
    delivered = [r for r in copies if r["status"] not in ("queued", "deferred", "bounced")]
    t_open = [r for r in delivered if r["tracked_opens"]]
    t_click = [r for r in delivered if r["tracked_clicks"]]
    expected = {"sent": str(len(mine)),
                "open_rate": pct(sum(1 for r in t_open if r["opens"]), len(t_open)),
                "click_rate": pct(sum(1 for r in t_click if r["clicks"]), len(t_click)),
                "reply_rate": pct(sum(1 for r in delivered if r["status"] == "replied"), len(delivered)),
                "bounced": str(sum(1 for r in copies if r["status"] == "bounced"))}
    assert expected == {"sent": "1", "open_rate": "50 %", "click_rate": "50 %", "reply_rate": "0 %", "bounced": "0"}
    async with local_session() as s:
        await sign_in(s, relay, "alice")
        async with s.get(base(relay) + "/dashboard?user=carl") as r:  # not an admin: ?user= is ignored
            page = await r.text()
        for period in ("Today", "7 days", "30 days"):
            assert {f: figure(page, period, f) for f in expected} == expected, period
            assert figure(page, period, "sent", "prev") == "0"
        assert "<svg" in page and "Human opens (1) and clicks (1) per day" in page
        assert "Carl note" not in page and "erin@ext.test" not in page
        assert "clicked 1 time" in page  # Carol is to follow up
        async with s.get(base(relay) + "/") as r:
            feed = await r.text()
        assert "Offer" in feed and "Carl note" not in feed and "erin@ext.test" not in feed
        assert 'href="/contacts/carol@ext.test"' in feed and "Carol Closer" in feed
        (erin_copy,) = (await relay.rows("SELECT id FROM recipients WHERE address = 'erin@ext.test'"))[0]
        for path in (f"/messages/{carl_mid}", f"/messages/{carl_mid}/card", f"/messages/{carl_mid}/copies/{erin_copy}",
                     f"/messages/{carl_mid}/copies/{erin_copy}/body", f"/messages/{alice_mid}/copies/{erin_copy}"):
            async with s.get(base(relay) + path) as r:
                assert r.status == 404, path
        async with s.get(base(relay) + "/contacts/erin@ext.test") as r:
            erin = await r.text()
        assert 'data-type="sent"' not in erin  # carl's mail to her is not alice's to see
        async with s.get(base(relay) + "/?q=erin") as r:
            assert "Carl note" not in await r.text()
    async with local_session() as s:
        await sign_in(s, relay, "bob")  # an admin: the team, and one user
        async with s.get(base(relay) + "/dashboard") as r:
            team = await r.text()
        assert figure(team, "Today", "sent") == "2"
        async with s.get(base(relay) + "/dashboard?user=carl") as r:
            carl = await r.text()
        assert figure(carl, "Today", "sent") == "1" and figure(carl, "Today", "open_rate") == "0 %"
        async with s.get(base(relay) + "/?q=erin") as r:
            found = await r.text()
        assert "Carl note" in found and "Offer" not in found
        async with s.get(base(relay) + "/contacts/erin@ext.test") as r:
            erin = await r.text()
        assert 'data-type="sent"' in erin and "Erin Evans" in erin


async def test_feed_filters_and_search_over_http(relay, sink):
    await start(relay)
    await seed(relay, sink)
    async with local_session() as s:
        await sign_in(s, relay, "bob")

        async def subjects(query: str) -> set[str]:
            async with s.get(base(relay) + "/" + query) as r:
                assert r.status == 200
                return set(re.findall(r'class="subject" href="/messages/\d+">([^<]+)<', await r.text()))

        assert await subjects("") == {"Offer", "Carl note"}
        assert await subjects("?status=opened") == {"Offer"}
        assert await subjects("?status=clicked") == {"Offer"}
        assert await subjects("?status=not_opened") == {"Offer", "Carl note"}  # Dave, Erin
        assert await subjects("?status=replied") == set()
        assert await subjects("?status=bounced") == set()
        assert await subjects("?status=tracked") == {"Offer", "Carl note"}
        assert await subjects("?q=carl+NOTE") == {"Carl note"}
        assert await subjects("?q=dave%40ext") == {"Offer"}
        assert await subjects("?q=ext.test&status=clicked") == {"Offer"}
        assert await subjects("?q=100%25") == set()  # LIKE wildcards are literal
        async with s.get(base(relay) + "/") as r:
            page = await r.text()

        def row(address: str) -> str:
            part = page[page.index(f'data-recipient="{address}"'):]
            return part[:part.index("</tr>")]

        # the sender's own open is shown as such, not as a machine's (issue 21); the HEAD is a machine's
        assert "+1 you" in row("carol@ext.test") and 'class="machine"' not in row("carol@ext.test")
        assert "+1 machine" in row("dave@ext.test") and 'class="self"' not in row("dave@ext.test")
        import csv
        import io
        async with s.get(base(relay) + "/export/feed.csv?status=clicked") as r:
            assert r.headers["Content-Type"].startswith("text/csv") and "attachment" in r.headers["Content-Disposition"]
            rows = list(csv.DictReader(io.StringIO(await r.text())))
        assert [(x["subject"], x["recipient"], x["status"], x["clicks"]) for x in rows] == [
            ("Offer", "carol@ext.test", "clicked", "1"), ("Offer", "dave@ext.test", "sent", "0")]
        assert rows[0]["name"] == "Carol Closer" and rows[0]["links"] == "https://example.com/offer?a=1&b=2"
        async with s.get(base(relay) + "/contacts/carol@ext.test/activity.csv") as r:
            acts = list(csv.DictReader(io.StringIO(await r.text())))
        assert sorted(a["activity"] for a in acts) == ["clicked", "opened", "opened", "sent"]
        assert [a["link"] for a in acts if a["activity"] == "clicked"] == ["https://example.com/offer?a=1&b=2"]
        assert [a["who"] for a in acts if a["activity"] == "opened"].count("you: from your own address") == 1
        async with s.get(base(relay) + "/contacts?q=decider") as r:
            page = await r.text()
        assert "Dave Decider" in page and "carol@ext.test" not in page
        async with s.get(base(relay) + "/contacts?sort=name&dir=asc") as r:
            names = re.findall(r'data-contact="([^"]+)"', await r.text())
        assert names[:3] == ["carol@ext.test", "dave@ext.test", "erin@ext.test"]


@pytest.mark.browser
async def test_chromium_new_york_time_new_message_live_filters_and_search(relay, sink, shots):
    from zoneinfo import ZoneInfo

    from browser import chromium_page
    await start(relay)
    alice_mid, _ = await seed(relay, sink)
    (at,) = (await relay.rows("SELECT at FROM events WHERE type = 'clicked'"))[0]
    at = at if not isinstance(at, str) else __import__("datetime").datetime.fromisoformat(at)
    at = at.replace(tzinfo=__import__("datetime").timezone.utc) if at.tzinfo is None else at
    ny = at.astimezone(ZoneInfo("America/New_York"))
    expected = ny.strftime("%Y-%m-%d %H:%M ") + ny.tzname()
    async with chromium_page(timezone_id="America/New_York") as page:
        await page.goto(base(relay) + "/login")
        await page.fill("input[name=username]", "alice")
        await page.fill("input[name=password]", PASSWORD)
        await page.click("button[type=submit]")
        await page.wait_for_url(base(relay) + "/")
        await page.goto(base(relay) + f"/messages/{alice_mid}")
        cell = page.locator("tr.c-human", has_text="clicked").locator("time[data-abs]")
        assert await cell.inner_text() == expected
        assert await page.locator("#zone").inner_text() == "America/New_York"
        # The browser's zone went to the server: the next page is rendered in it.
        jar = "; ".join(f'{c["name"]}={c["value"]}' for c in await page.context.cookies())
        async with aiohttp.ClientSession(headers={"Cookie": jar}) as s:
            async with s.get(base(relay) + f"/messages/{alice_mid}") as r:
                html = await r.text()
        assert expected in html and "Times in <span id=\"zone\">America/New_York" in html, (jar, html[-1500:])

        await page.goto(base(relay) + "/")
        assert "ago" in await page.locator("article[data-subject=Offer] time[data-rel]").first.inner_text() or \
            await page.locator("article[data-subject=Offer] time[data-rel]").first.inner_text() == "just now"
        assert (await page.locator("article[data-subject=Offer] time[data-rel]").first.get_attribute("title")
                ).endswith(("EST", "EDT"))
        await page.wait_for_function("document.documentElement.dataset.live === '1'")
        await asyncio.sleep(0.5)  # the stream is connected
        loop = asyncio.get_running_loop()
        await send(relay, ["frank@ext.test"], HTML_MSG.replace(b"Subject: Offer", b"Subject: Live one"))
        sent = loop.time()
        await page.locator("article[data-subject='Live one']").wait_for(timeout=1000)
        took = loop.time() - sent
        print(f"new message on the open feed {took * 1000:.0f} ms after the relay's 250")
        assert took < 1.0
        assert await page.locator("article[data-message]").first.get_attribute("data-subject") == "Live one"

        async def shown() -> list[str]:
            return [await a.get_attribute("data-subject") for a in await page.locator("article[data-message]").all()]

        await page.click("a.chip:text-is('Opened')")
        await page.wait_for_load_state()
        assert await shown() == ["Offer"]
        await page.click("a.chip:text-is('Not opened')")
        await page.wait_for_load_state()
        assert set(await shown()) == {"Offer", "Live one"}
        await page.fill("#q", "frank")
        await page.press("#q", "Enter")
        await page.wait_for_load_state()
        assert await shown() == ["Live one"] and "status=not_opened" in page.url
        await page.click("a.chip:text-is('Clicked')")
        await page.wait_for_load_state()
        assert await shown() == [] and "No mail matches" in await page.locator("main").inner_text()
        await page.click("a.chip:text-is('All mail')")
        await page.wait_for_load_state()
        assert await shown() == ["Live one"]


PAGES = ("/dashboard", "/", "/messages/{mid}", "/contacts", "/contacts/carol@ext.test", "/settings")


@pytest.mark.browser
async def test_chromium_contact_timeline_message_page_settings_every_page_accessible_without_js(relay, sink, shots):
    from browser import axe_source, axe_violations, chromium_browser
    users = relay.config_dict()["users"]
    users[0]["never_log"] = ["*@secret.test"]
    await start(relay, users=users)
    alice_mid, _ = await seed(relay, sink)
    axe = axe_source()
    async with chromium_browser() as browser:
        context = await browser.new_context(user_agent=IPHONE_UA, bypass_csp=True)  # to inject axe-core
        page = await context.new_page()
        await page.goto(base(relay) + "/login")
        await page.fill("input[name=username]", "alice")
        await page.fill("input[name=password]", PASSWORD)
        await page.click("button[type=submit]")
        await page.wait_for_url(base(relay) + "/")

        await page.goto(base(relay) + "/contacts/carol@ext.test")
        assert await page.locator("h1").inner_text() == "Carol Closer"
        clicked = page.locator("li.activity[data-type=clicked]")
        assert await clicked.count() == 1
        assert await clicked.locator(".link-clicked").inner_text() == "https://example.com/offer?a=1&b=2"
        assert "Offer" in await clicked.inner_text()
        assert await page.locator("li.activity[data-type=sent]").count() == 1
        assert await page.locator("li.activity.c-human[data-type=opened]").count() == 1
        fold = page.locator("details.machine-fold")  # alice's own open, folded away
        assert await fold.count() == 1 and not await fold.locator("li").first.is_visible()
        await fold.locator("summary").click()
        assert "you: from your own address" in await fold.inner_text()

        await page.goto(base(relay) + f"/messages/{alice_mid}")
        link = page.locator("tr[data-link='https://example.com/offer?a=1&b=2']")
        assert [await link.locator(c).inner_text() for c in (".n-human", ".n-machine", ".n-you")] == ["1", "0", "0"]
        own = page.locator("tr.c-self")
        assert await own.locator(".who").inner_text() == "you: from your own address"
        head = page.locator("tr.c-machine")
        assert await head.locator(".who").inner_text() == "machine: a HEAD request (a link checker, not a browser)"
        ua = page.locator("tr.c-human details.ua").first
        assert "iOS" in await ua.locator("summary").inner_text()
        assert not await ua.locator("code").is_visible()
        await ua.locator("summary").click()
        assert await ua.locator("code").inner_text() == IPHONE_UA

        # Settings: the config entry is read-only; one added in the page takes effect, then goes.
        await page.goto(base(relay) + "/settings")
        config_entry = page.locator("ul[data-scope=user] li[data-entry='*@secret.test']")
        assert await config_entry.locator(".tag").inner_text() == "config"
        assert await config_entry.locator("button").count() == 0
        assert await page.locator("#add-team").count() == 0  # not an admin
        await page.fill("#add-user", "Grace@Ext.Test")
        await page.click("form.add:has(#add-user) button")
        await page.wait_for_load_state()
        assert await page.locator("ul[data-scope=user] li[data-entry='grace@ext.test']").count() == 1
        await asyncio.sleep(2.2)  # the relay reads the lists at most every 2 s
        await send(relay, ["grace@ext.test", "henry@ext.test"])
        await relay.wait_status({"sent"}, 5)
        flags = dict(await relay.rows("SELECT address, never_log FROM recipients WHERE address IN "
                                      "('grace@ext.test', 'henry@ext.test')"))
        assert bool(flags["grace@ext.test"]) and not bool(flags["henry@ext.test"])
        await page.fill("#add-user", "bad entry@@")
        await page.click("form.add:has(#add-user) button")
        assert await page.locator("p.error[role=alert]").count() == 1
        await page.goto(base(relay) + "/settings")
        await page.locator("li[data-entry='grace@ext.test'] button").click()
        await page.wait_for_load_state()
        assert await page.locator("li[data-entry='grace@ext.test']").count() == 0
        assert await page.locator("li[data-entry='*@secret.test']").count() == 1

        # An API token made in the page authenticates; revoked there, it no longer does.
        await page.goto(base(relay) + "/settings")
        assert await page.locator("li[data-token=config] .tag").inner_text() == "config"
        await page.fill("#token-name", "CRM sync")
        await page.click("form.add:has(#token-name) button")
        await page.wait_for_load_state()
        token = await page.locator("#new-token").inner_text()
        assert token.startswith("trk_") and len(token) > 40

        async def api_status() -> int:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
                async with s.get(base(relay) + "/api/v1/messages") as r:
                    return r.status if r.status != 200 else (r.status, [m["id"] for m in (await r.json())["messages"]])

        alices = [i for (i,) in await relay.rows("SELECT id FROM messages WHERE kind = 'mail' AND \"user\" = 'alice' "
                                                 "ORDER BY id DESC")]
        assert alice_mid in alices and len(alices) == 2
        assert await api_status() == (200, alices)  # alice's mail only, as her own token
        (stored,) = (await relay.rows("SELECT token_hash FROM api_tokens"))[0]
        assert token not in stored and stored.startswith("sha256:")
        await page.goto(base(relay) + "/settings")
        assert "trk_" not in await page.content()  # shown once
        await page.locator("li[data-token]:has-text('CRM sync') button").click()
        await page.wait_for_load_state()
        assert await page.locator("li[data-token]:has-text('CRM sync')").count() == 0
        assert await api_status() == 401

        # Every page: no WCAG 2 A/AA violation, no sideways scrolling on a phone, screenshots.
        for path in PAGES + ("/login",):
            url = base(relay) + path.format(mid=alice_mid)
            name = {"/": "activity", "/login": "login", "/contacts/carol@ext.test": "contact",
                    "/messages/{mid}": "message"}.get(path, path.strip("/"))
            target = page
            if path == "/login":
                target = await (await browser.new_context(bypass_csp=True)).new_page()
            for width, suffix in ((1280, ""), (390, "-phone")):
                await target.set_viewport_size({"width": width, "height": 800 if width > 400 else 844})
                await target.goto(url)
                assert await target.evaluate("document.documentElement.scrollWidth") <= width, (path, width)
                await target.screenshot(path=str(shots / f"{name}{suffix}.png"), full_page=True)
            violations = await axe_violations(target, axe)
            assert violations == [], (path, violations)

        # Without JavaScript every page still shows its content (times in UTC, labelled).
        nojs = await browser.new_context(java_script_enabled=False, user_agent=IPHONE_UA)
        await nojs.add_cookies([c for c in await context.cookies() if c["name"] != "tz"])
        p2 = await nojs.new_page()
        for path in PAGES:
            await p2.goto(base(relay) + path.format(mid=alice_mid))
            text = await p2.locator("main").inner_text()
            assert "Offer" in text or path in ("/contacts", "/settings"), path
            assert await p2.locator("#zone").inner_text() == "UTC"
        await p2.goto(base(relay) + "/dashboard")
        assert await p2.locator("svg.chart").count() == 2
        await p2.goto(base(relay) + "/contacts")
        assert await p2.locator("tr[data-contact='carol@ext.test']").count() == 1


@pytest.mark.browser
async def test_chromium_view_the_copy_a_recipient_got_sandboxed_and_recording_nothing(relay, sink):
    from browser import chromium_page
    await start(relay)
    await send(relay, ["carol@ext.test"])
    (got,) = await sink.wait_for(1)
    await relay.wait_status({"sent"}, 1)
    (mid,) = (await relay.rows("SELECT id FROM messages"))[0]
    (token,) = (await relay.rows("SELECT token FROM recipients"))[0]
    async with chromium_page() as page:
        await page.goto(base(relay) + "/login")
        await page.fill("input[name=username]", "alice")
        await page.fill("input[name=password]", PASSWORD)
        await page.click("button[type=submit]")
        await page.wait_for_url(base(relay) + "/")
        await page.goto(base(relay) + f"/messages/{mid}")
        await page.click("text=View the copy sent to carol@ext.test")
        await page.wait_for_load_state()
        frame_el = page.locator("iframe.copy")
        assert await frame_el.get_attribute("sandbox") == ""
        frame = page.frame_locator("iframe.copy")
        src = await frame.locator("img").first.get_attribute("src")
        assert src.endswith(f"/o/{token}.gif") and src in got.data.decode()
        hrefs = [await a.get_attribute("href") for a in await frame.locator("a").all()]
        assert hrefs and all("/c/" in h and h in got.data.decode() for h in hrefs)
        async with aiohttp.ClientSession(headers={"Cookie": "; ".join(
                f'{c["name"]}={c["value"]}' for c in await page.context.cookies())}) as s:
            async with s.get(base(relay) + f"/messages/{mid}/copies/{(await relay.rows('SELECT id FROM recipients'))[0][0]}/body") as r:
                assert r.headers["Content-Security-Policy"].startswith("sandbox;")
                assert "img-src data:" in r.headers["Content-Security-Policy"]
    await asyncio.sleep(0.3)
    await relay.events_written()
    assert await relay.rows("SELECT id FROM events WHERE type = 'opened'") == []  # viewing is no open


def test_csv_cells_never_start_a_formula():
    from tracker_http.pages import _cell
    assert [_cell(v) for v in ("=HYPERLINK(1)", "+1", "-2", "@SUM(A1)", "Offer", None, 3)] == [
        "'=HYPERLINK(1)", "'+1", "'-2", "'@SUM(A1)", "Offer", "", "3"]
