"""Apple's two lists: Mail Privacy Protection ranges make an OPEN machine; iCloud Private Relay
ranges (people browsing) make nothing machine. The refresh against a real HTTP server on loopback,
the tracker over real HTTP with the client's address given by a trusted proxy's X-Forwarded-For."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from conftest import RelayFixture
from helpers import make_config
from test_tracker import BROWSER_UA, events, send_tracked, start
from tracker_http import apple
from tracker_http.netaddr import RangeSet, apple_ranges_path, networks

MPP_ADDR = "17.58.100.4"  # Apple's own network: MPP's prefetch
RELAY_ADDR = "172.224.226.7"  # a Private Relay egress
RELAY_IN_APPLE = "17.253.1.5"  # Private Relay egress inside Apple's block: Private Relay wins
AS714 = {"status": "ok", "data": {"resource": "714", "prefixes": [
    {"prefix": "17.0.0.0/8", "timelines": []}, {"prefix": "2620:149::/32", "timelines": []},
    {"prefix": "198.51.100.0/24", "timelines": []}]}}
EGRESS = ("172.224.226.0/27,GB,GB-EN,London,\n172.224.226.32/31,GB,GB-EN,London,\n"
          "17.253.1.0/24,US,US-CA,Cupertino,\n2a02:26f7:b3c0:4000::/64,DE,DE-BE,Berlin,\n")
SAFARI_UA = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
             "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1")
APPLE_MAIL_UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"


@pytest.fixture
async def sources():
    """RIPEstat's announced-prefixes JSON, Apple's egress CSV, and bodies that are neither."""
    bodies = {"/as714.json": json.dumps(AS714), "/egress.csv": EGRESS,
              "/html": "<html><body><h1>503 Service Unavailable</h1></body></html>",
              "/error.json": json.dumps({"status": "error", "messages": [["error", "no such resource"]]}),
              "/list.json": json.dumps({"prefixes": ["17.0.0.0/8"]}), "/everything.txt": "0.0.0.0/0\n"}
    hits: list[str] = []

    async def serve(request):
        hits.append(request.path)
        return web.Response(text=bodies[request.path])

    app = web.Application()
    for path in bodies:
        app.router.add_get(path, serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield base, hits
    await runner.cleanup()


def write_config(tmp_path, base, mpp="/as714.json", relay="/egress.csv"):
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[storage]\nurl = "sqlite+aiosqlite:///{tmp_path}/t.db"\n[relay]\nhostname = "h.example"\n'
                   f'[tracker]\napple_mpp_ranges_url = "{base}{mpp}"\n'
                   f'apple_private_relay_ranges_url = "{base}{relay}"\n')
    return cfg


async def cli(*words) -> int:
    from trackrelay.cli import main
    return await asyncio.to_thread(main, list(words))


async def test_refresh_fetches_each_list_from_its_configured_url(tmp_path, sources, capsys):
    base, hits = sources
    cfg = write_config(tmp_path, base)
    assert await cli("-c", str(cfg), "check-config") == 0
    assert await cli("-c", str(cfg), "tracker", "refresh-apple-ranges") == 0
    assert sorted(hits) == ["/as714.json", "/egress.csv"]
    mpp = RangeSet.from_file(tmp_path / "apple_mpp_ranges.txt")
    relay = RangeSet.from_file(tmp_path / "apple_private_relay_ranges.txt")
    assert MPP_ADDR in mpp and "2620:149::1" in mpp and RELAY_ADDR not in mpp
    assert RELAY_IN_APPLE not in mpp and "17.253.2.1" in mpp and "17.253.0.255" in mpp  # taken out, no more
    assert RELAY_ADDR in relay and RELAY_IN_APPLE in relay and "2a02:26f7:b3c0:4000::9" in relay
    assert MPP_ADDR not in relay
    text = (tmp_path / "apple_private_relay_ranges.txt").read_text()
    assert "172.224.226.0/27\n172.224.226.32/31\n" in text  # one line per network
    assert text.startswith("# iCloud Private Relay egress ranges, from " + base + "/egress.csv")
    err = capsys.readouterr().err
    assert "Apple Mail Privacy Protection ranges:" in err and "iCloud Private Relay egress ranges: 4 networks" in err
    from core.config import load
    assert apple_ranges_path(load(str(cfg))) == tmp_path / "apple_mpp_ranges.txt"  # the tracker's choice


async def test_refresh_only_one_list(tmp_path, sources):
    base, hits = sources
    cfg = write_config(tmp_path, base)
    assert await cli("-c", str(cfg), "tracker", "refresh-apple-ranges", "--only", "relay") == 0
    assert hits == ["/egress.csv"]
    # the shipped MPP list (17.0.0.0/8) is written beside the database without the Private Relay part
    mpp = RangeSet.from_file(tmp_path / "apple_mpp_ranges.txt")
    assert MPP_ADDR in mpp and RELAY_IN_APPLE not in mpp and "198.51.100.1" not in mpp
    assert (tmp_path / "apple_mpp_ranges.txt").read_text().startswith(
        f"# Apple Mail Privacy Protection ranges, from {apple.MPP.shipped}\n")
    assert await cli("-c", str(cfg), "tracker", "refresh-apple-ranges", "--only", "mpp") == 0
    assert hits == ["/egress.csv", "/as714.json"]
    mpp = RangeSet.from_file(tmp_path / "apple_mpp_ranges.txt")
    assert "198.51.100.1" in mpp and RELAY_IN_APPLE not in mpp  # the Private Relay list in use, taken out
    (tmp_path / "apple_private_relay_ranges.txt").write_text("17.58.0.0/16\n")  # a new Private Relay list
    assert await cli("-c", str(cfg), "tracker", "refresh-apple-ranges", "--only", "relay",
                     "--file", str(tmp_path / "apple_private_relay_ranges.txt")) == 0
    mpp = RangeSet.from_file(tmp_path / "apple_mpp_ranges.txt")
    assert MPP_ADDR not in mpp and "17.59.0.1" in mpp
    assert (tmp_path / "apple_mpp_ranges.txt").read_text().startswith(
        f"# Apple Mail Privacy Protection ranges, from {base}/as714.json\n")  # still where it came from
    assert await cli("-c", str(cfg), "tracker", "refresh-apple-ranges", "--only", "relay",
                     "--url", f"{base}/egress.csv") == 0


@pytest.mark.parametrize("mpp, relay, said", [
    ("/as714.json", "/html", "/html: not a list of IP networks (0 networks, 1 other lines; line 1: '<html>"),
    ("/error.json", "/egress.csv", "/error.json: RIPEstat answered status 'error'"),
    ("/list.json", "/egress.csv", "/list.json: not RIPEstat announced-prefixes JSON (data.prefixes[].prefix)"),
    ("/everything.txt", "/egress.csv", "0.0.0.0/0 is broader than /8"),
    ("/missing", "/egress.csv", "cannot read http://127.0.0.1:"),
])
async def test_a_malformed_source_is_refused_and_the_old_lists_kept(tmp_path, sources, capsys, mpp, relay, said):
    base, _ = sources
    assert await cli("-c", str(write_config(tmp_path, base)), "tracker", "refresh-apple-ranges") == 0
    before = {p: (tmp_path / p).read_text() for p in ("apple_mpp_ranges.txt", "apple_private_relay_ranges.txt")}
    capsys.readouterr()
    assert await cli("-c", str(write_config(tmp_path, base, mpp, relay)), "tracker", "refresh-apple-ranges") == 1
    err = capsys.readouterr().err
    assert said in err and "nothing written, the lists in use are kept" in err
    assert {p: (tmp_path / p).read_text() for p in before} == before
    assert not list(tmp_path.glob("*.tmp"))


async def test_check_config_validates_the_urls_and_names_an_old_refresh(tmp_path, capsys):
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[storage]\nurl = "sqlite+aiosqlite:///{tmp_path}/t.db"\n[relay]\nhostname = "h.example"\n'
                   '[tracker]\napple_private_relay_ranges_url = "mask-api.icloud.com/egress-ip-ranges.csv"\n')
    assert await cli("-c", str(cfg), "check-config") == 1
    assert "tracker.apple_private_relay_ranges_url: must be an http(s) URL" in capsys.readouterr().err
    cfg.write_text(f'[storage]\nurl = "sqlite+aiosqlite:///{tmp_path}/t.db"\n[relay]\nhostname = "h.example"\n')
    # what the refresh wrote before there were two lists: Private Relay's egress, as MPP ranges
    (tmp_path / "apple_mpp_ranges.txt").write_text(
        "# Apple privacy proxy egress ranges, from https://mask-api.icloud.com/egress-ip-ranges.csv\n172.224.226.0/27\n")
    assert await cli("-c", str(cfg), "check-config") == 0
    assert "is the iCloud Private Relay list written as Mail Privacy Protection ranges" in capsys.readouterr().err


def test_an_old_refresh_of_private_relay_is_not_used_as_mpp_ranges(tmp_path):
    from core.config import load as load_config
    from tracker_http.netaddr import SHIPPED_APPLE_RANGES, apple_ranges_path

    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[storage]\nurl = "sqlite+aiosqlite:///{tmp_path}/t.db"\n[relay]\nhostname = "h.example"\n')
    config = load_config(cfg)
    refreshed = tmp_path / "apple_mpp_ranges.txt"
    refreshed.write_text("# Apple privacy proxy egress ranges, from https://mask-api.icloud.com/egress-ip-ranges.csv\n"
                         "172.224.226.0/27\n")
    assert apple_ranges_path(config) == SHIPPED_APPLE_RANGES
    refreshed.write_text(apple.MPP.shipped.read_text())  # what today's refresh writes: used
    assert apple_ranges_path(config) == refreshed


def test_shipped_lists_are_named_for_what_they_are():
    assert apple.MPP.shipped.name == "apple_mpp_ranges.txt" and apple.RELAY.shipped.name == "apple_private_relay_ranges.txt"
    mpp, relay = RangeSet.from_file(apple.MPP.shipped), RangeSet.from_file(apple.RELAY.shipped)
    assert MPP_ADDR in mpp and "8.8.8.8" not in mpp
    assert "Private Relay" in apple.RELAY.shipped.read_text() and "Mail Privacy Protection" in apple.MPP.shipped.read_text()
    assert apple.subtract(apple.read_networks(apple.MPP.shipped), apple.read_networks(apple.RELAY.shipped)) \
        == apple.read_networks(apple.MPP.shipped)


def test_subtract_and_collapse_at_the_size_of_apples_list():
    import time
    relay = [f"172.{16 + i // 65536}.{i // 256 % 256}.{i % 256}/32" for i in range(0, 400000, 2)]
    relay += [f"17.{i // 256}.{i % 256}.0/24" for i in range(0, 4096, 3)]
    t = time.perf_counter()
    merged = apple.collapse(relay)
    kept = apple.subtract(["17.0.0.0/8", "2620:149::/32"], merged)
    took = time.perf_counter() - t
    assert "2620:149::/32" in kept and took < 10
    ranges = RangeSet(networks(kept))
    assert "17.0.0.1" not in ranges and "17.0.1.1" in ranges and "17.0.3.9" not in ranges and "17.16.0.1" in ranges


# -- the tracker over HTTP -------------------------------------------------------------------------

@pytest.fixture
async def relay(tmp_path, sink):
    """SQLite: the refreshed lists go beside the database, in this test's directory."""
    r = RelayFixture(tmp_path, f"sqlite+aiosqlite:///{tmp_path}/trackrelay.db", sink)
    yield r
    await r.stop()


async def refreshed(relay, base, **sections):
    cfg = make_config(relay.config_dict(tracker={"apple_mpp_ranges_url": f"{base}/as714.json",
                                                 "apple_private_relay_ranges_url": f"{base}/egress.csv"}))
    written = await apple.refresh(cfg)
    assert [(lst.key, path.parent) for lst, _, path in written] == [("relay", relay.tmp_path), ("mpp", relay.tmp_path)]


async def hit(url, ip, ua):
    import aiohttp
    async with aiohttp.ClientSession(headers={"User-Agent": ua}) as s:
        async with s.get(url, headers={"X-Forwarded-For": f"203.0.113.9, {ip}"}, allow_redirects=False) as r:
            assert r.status in (200, 302)


@pytest.mark.parametrize("writer_process", [True, False])
async def test_mpp_open_is_machine_private_relay_hits_are_people(relay, sink, sources, writer_process):
    base, _ = sources
    await refreshed(relay, base)
    await start(relay, tracker={"trusted_proxies": ["127.0.0.1"], "writer_process": writer_process},
                privacy={"store_ip": "full"})
    t = await send_tracked(relay)
    await hit(t.pixel("carol@ext.test"), MPP_ADDR, APPLE_MAIL_UA)
    (row,) = await events(relay)
    assert row[2:4] == ("machine", "apple_privacy_proxy") and row[5] == MPP_ADDR
    await hit(t.pixel("carol@ext.test"), RELAY_ADDR, APPLE_MAIL_UA)
    await hit(t.pixel("carol@ext.test"), RELAY_IN_APPLE, APPLE_MAIL_UA)
    rows = await events(relay, want=3)
    assert [(r[0], r[2], r[3], r[5]) for r in rows[1:]] == [
        ("opened", "human", None, RELAY_ADDR), ("opened", "human", None, RELAY_IN_APPLE)]
    await hit(t.clicks("carol@ext.test")[0], RELAY_ADDR, SAFARI_UA)
    rows = await events(relay, want=4)
    assert (rows[-1][0], rows[-1][2], rows[-1][3], rows[-1][5]) == ("clicked", "human", None, RELAY_ADDR)


async def test_a_click_from_apples_own_network_is_not_machine_by_its_address(relay, sink):
    await start(relay, tracker={"trusted_proxies": ["127.0.0.1"]}, privacy={"store_ip": "full"})
    t = await send_tracked(relay)
    await hit(t.clicks("carol@ext.test")[0], MPP_ADDR, SAFARI_UA)
    rows = await events(relay, want=2)  # the click, and the open it shows
    (row,) = [r for r in rows if r[0] == "clicked"]
    assert (row[0], row[2], row[3], row[5]) == ("clicked", "human", None, MPP_ADDR)


async def test_sighup_reads_the_refreshed_list(relay, sink, sources):
    base, _ = sources
    await start(relay, tracker={"trusted_proxies": ["127.0.0.1"]}, privacy={"store_ip": "full"})
    t = await send_tracked(relay)
    await hit(t.pixel("carol@ext.test"), "198.51.100.7", APPLE_MAIL_UA)  # not Apple's in the shipped list
    (row,) = await events(relay)
    assert row[2] == "human"
    await refreshed(relay, base)
    await relay.service.reload(relay.config)
    await hit(t.pixel("carol@ext.test"), "198.51.100.8", APPLE_MAIL_UA)
    await relay.events_written()
    rows = await events(relay, want=2)
    assert rows[-1][2:4] == ("machine", "apple_privacy_proxy") and rows[-1][5] == "198.51.100.8"
