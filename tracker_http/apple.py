"""Apple's two address lists, and refreshing them (``trackrelay tracker refresh-apple-ranges``).

- **Mail Privacy Protection** (``apple_mpp_ranges.txt``): Apple's own network, from which Apple
  Mail's proxy prefetches remote images whether or not the message is read. An *open* from one of
  these addresses is machine (``apple_privacy_proxy``); a click never is because of its address.
  Apple publishes no list of MPP's egress addresses, so the refresh reads the prefixes announced by
  Apple's AS714 (RIPEstat's ``announced-prefixes`` JSON, or one network per line); shipped:
  ``17.0.0.0/8``.
- **iCloud Private Relay** (``apple_private_relay_ranges.txt``): the egress of Apple's relay for
  people's own browsing, published by Apple as CSV (``prefix,country,region,city,``). Hits from
  these addresses are people: the list makes nothing machine. It is subtracted from the MPP list
  when that is written, so that an address on both is never taken for MPP.

Each refreshed list is written beside the database (where ``trackrelay.key`` goes); the tracker
prefers it to the copy shipped in ``tracker_http/data/`` and reads it again on SIGHUP.
"""

from __future__ import annotations

import bisect
import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import aiohttp

from core.links import key_file_path
from tracker_http.netaddr import SHIPPED_APPLE_RANGES, written_by_old_refresh

MPP_URL = "https://stat.ripe.net/data/announced-prefixes/data.json?resource=AS714"
RELAY_URL = "https://mask-api.icloud.com/egress-ip-ranges.csv"
APPLE_EGRESS_URL = RELAY_URL  # the name before there were two lists
MAX_BYTES = 256 * 1024 * 1024  # Apple's CSV is some tens of MB
#: The broadest network a Mail Privacy Protection list may hold (a /0 would make every open machine).
MIN_PREFIX = {4: 8, 6: 16}


class RangesError(ValueError):
    """A source that is not the list it should be (its old file is kept)."""


_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_BITS = {4: 32, 6: 128}


def _span(spec: str) -> tuple[int, int, int] | None:
    """``addr[/len]`` as (IP version, first, last address as int); host bits ignored. None when it is
    no network. inet_pton, not ipaddress: Apple's list has some hundred thousand lines."""
    addr, _, plen = spec.strip().partition("/")
    version = 6 if ":" in addr else 4
    try:
        packed = socket.inet_pton(_FAMILY[version], addr)
        bits = _BITS[version]
        n = int(plen) if plen else bits
    except (OSError, ValueError):
        return None
    if not 0 <= n <= bits or (plen and not plen.isdigit()):
        return None
    host = (1 << (bits - n)) - 1
    lo = int.from_bytes(packed, "big") & ~host
    return version, lo, lo | host


def _cidrs(version: int, lo: int, hi: int) -> list[str]:
    """The fewest networks covering lo..hi exactly."""
    bits, family, size = _BITS[version], _FAMILY[version], _BITS[version] // 8
    out = []
    while lo <= hi:
        step = min((lo & -lo).bit_length() - 1 if lo else bits, (hi - lo + 1).bit_length() - 1)
        out.append(f"{socket.inet_ntop(family, lo.to_bytes(size, 'big'))}/{bits - step}")
        lo += 1 << step
    return out


def _network(spec: str) -> str | None:
    span = _span(spec)
    return _cidrs(*span)[0] if span else None


def _lines(text: str, source: str) -> list[str]:
    """One network per line (``#`` comments; of a CSV line its first field); refused when no line,
    or fewer than half of them, is a network (an HTML error page, another format)."""
    out: list[str] = []
    bad: list[tuple[int, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        net = _network(line.split(",", 1)[0])
        if net is None:
            bad.append((n, line))
        else:
            out.append(net)
    if not out or len(bad) > len(out):
        where = f"; line {bad[0][0]}: {bad[0][1][:60]!r}" if bad else ""
        raise RangesError(f"{source}: not a list of IP networks ({len(out)} networks, "
                          f"{len(bad)} other lines{where})")
    return out


def parse_ranges(text: str, source: str = "the list") -> list[str]:
    """Apple's Private Relay egress CSV (``prefix,country,region,city,``), or one network per line."""
    return _lines(text, source)


def parse_mpp(text: str, source: str = "the list") -> list[str]:
    """RIPEstat's announced-prefixes JSON (``data.prefixes[].prefix``), or one network per line (of
    a CSV line its first field); refused when a network is broader than ``MIN_PREFIX``."""
    if text.lstrip().startswith("{"):
        try:
            body = json.loads(text)
            if body.get("status", "ok") != "ok":
                raise RangesError(f"{source}: RIPEstat answered status {body.get('status')!r}: "
                                  f"{body.get('messages')}")
            prefixes = body["data"]["prefixes"]
            nets = [_network(p["prefix"]) for p in prefixes]
        except RangesError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RangesError(f"{source}: not RIPEstat announced-prefixes JSON "
                              f"(data.prefixes[].prefix): {type(e).__name__}: {e}") from None
        if not nets or None in nets:
            raise RangesError(f"{source}: RIPEstat JSON without prefixes, or with one that is not a network")
        out = [n for n in nets if n is not None]
    else:
        out = _lines(text, source)
    for n in out:
        net = ipaddress.ip_network(n)
        if net.prefixlen < MIN_PREFIX[net.version]:
            raise RangesError(f"{source}: {n} is broader than /{MIN_PREFIX[net.version]}: it would "
                              "take every reader behind it for Apple's proxy")
    return out


def _merged(nets: list[str]) -> dict[int, tuple[list[int], list[int]]]:
    """Per IP version: disjoint sorted spans (starts, ends) covering ``nets``."""
    spans: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    for n in nets:
        span = _span(n)
        if span:
            spans[span[0]].append(span[1:])
    out = {}
    for v, items in spans.items():
        starts: list[int] = []
        ends: list[int] = []
        for a, b in sorted(items):
            if ends and a <= ends[-1] + 1:
                if b > ends[-1]:
                    ends[-1] = b
            else:
                starts.append(a)
                ends.append(b)
        out[v] = (starts, ends)
    return out


def collapse(nets: list[str]) -> list[str]:
    """The fewest networks covering exactly ``nets`` (Apple's CSV lists one line per city)."""
    out: list[str] = []
    for v, (starts, ends) in _merged(nets).items():
        for a, b in zip(starts, ends):
            out.extend(_cidrs(v, a, b))
    return out


def subtract(nets: list[str], minus: list[str]) -> list[str]:
    """``nets`` without any address of ``minus``, as networks (untouched ones as given)."""
    cut = _merged(minus)
    out: list[str] = []
    for n in nets:
        span = _span(n)
        if span is None:
            continue
        version, lo, hi = span
        starts, ends = cut[version]
        i = max(bisect.bisect_right(starts, lo) - 1, 0)
        start, touched = lo, False
        while i < len(starts) and starts[i] <= hi:
            if ends[i] >= start:
                touched = True
                if starts[i] > start:
                    out.extend(_cidrs(version, start, starts[i] - 1))
                start = ends[i] + 1
            i += 1
        if not touched:
            out.append(n)
        elif start <= hi:
            out.extend(_cidrs(version, start, hi))
    return out


@dataclass(frozen=True)
class AppleList:
    key: str  # "mpp" or "relay", as in ``--only``
    title: str
    file: str  # its name beside the database and in tracker_http/data/
    config_key: str
    url: Callable[[object], str]
    parse: Callable[[str, str], list[str]]

    @property
    def shipped(self) -> Path:
        return Path(__file__).parent / "data" / self.file

    def refreshed(self, config) -> Path:
        return key_file_path(config.storage.url).parent / self.file

    def path(self, config) -> Path:
        """The refreshed list beside the database if there is one, else the one shipped."""
        refreshed = self.refreshed(config)
        return refreshed if refreshed.is_file() else self.shipped


MPP = AppleList("mpp", "Apple Mail Privacy Protection ranges", SHIPPED_APPLE_RANGES.name,
                "tracker.apple_mpp_ranges_url", lambda c: c.tracker.apple_mpp_ranges_url, parse_mpp)
RELAY = AppleList("relay", "iCloud Private Relay egress ranges", "apple_private_relay_ranges.txt",
                  "tracker.apple_private_relay_ranges_url",
                  lambda c: c.tracker.apple_private_relay_ranges_url, parse_ranges)
LISTS = {"mpp": MPP, "relay": RELAY}


def read_networks(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        net = _network(line.split(",", 1)[0]) if line else None
        if net:
            out.append(net)
    return out


def _source_of(path: Path, title: str) -> str:
    """Where a list the refresh wrote came from (its first line says), else the file itself."""
    try:
        with path.open() as f:
            first = f.readline().rstrip("\n")
    except OSError:
        return str(path)
    head = f"# {title}, from "
    return first[len(head):] if first.startswith(head) else str(path)


async def fetch(url: str, timeout: float = 120) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.get(url) as r:
            r.raise_for_status()
            body = await r.content.read(MAX_BYTES + 1)
            if len(body) > MAX_BYTES:
                raise RangesError(f"{url}: more than {MAX_BYTES} bytes")
            return body.decode(r.charset or "utf-8", errors="replace")


def write_ranges(path: Path, networks: list[str], header: str) -> None:
    """Atomically: the tracker (or its SIGHUP) never reads half a file."""
    tmp = path.with_suffix(".tmp")
    lines = "".join(f"# {h}\n" for h in header.splitlines())
    tmp.write_text(lines + "\n".join(networks) + "\n")
    os.replace(tmp, path)


def stale_mpp_file(config) -> Path | None:
    """A Mail Privacy Protection file written by the refresh before there were two lists, from
    the Private Relay list (not used: ``netaddr.apple_ranges_path``). Said at start and by check-config."""
    path = MPP.refreshed(config)
    return path if written_by_old_refresh(path) else None


async def refresh(config, only: str | None = None, url: str | None = None,
                  file: str | None = None, say: Callable[[str], None] = lambda s: None) -> list[tuple[AppleList, int, Path]]:
    """Fetch and check every list asked for (``only``: one of them; ``url``/``file``: its source),
    then write them: nothing is written unless every source was good. The MPP list is written
    without the Private Relay ranges (the new ones, or those in use)."""
    wanted = [LISTS[only]] if only else [MPP, RELAY]
    got: dict[str, tuple[list[str], str]] = {}
    for lst in wanted:
        source = file or url or lst.url(config)
        say(f"reading the {lst.title} from {source} …")
        try:
            text = Path(file).read_text() if file else await fetch(source)
        except RangesError:
            raise
        except Exception as e:
            raise RangesError(f"cannot read {source}: {type(e).__name__}: {e}") from None
        nets = lst.parse(text, source)
        if lst is MPP and _looks_like_relay_csv(text):
            say(f"warning: {source} looks like Apple's Private Relay egress CSV; its ranges are "
                "written as Mail Privacy Protection ranges only where they are not Private Relay's "
                "(--only relay refreshes the Private Relay list)")
        got[lst.key] = (nets, source)
    written = []
    if "relay" in got:
        nets, source = got["relay"]
        nets = collapse(nets)
        got["relay"] = (nets, source)
        out = RELAY.refreshed(config)
        write_ranges(out, nets, f"{RELAY.title}, from {source}\nPeople's browsing: makes no hit machine.")
        written.append((RELAY, len(nets), out))
    relay_nets = got["relay"][0] if "relay" in got else read_networks(RELAY.path(config))
    if "mpp" in got:
        nets, source = got["mpp"]
    else:  # a new Private Relay list: the MPP list in use, without it
        current = MPP.path(config)
        nets, source = read_networks(current), _source_of(current, MPP.title)
    kept = subtract(nets, relay_nets)
    if "mpp" in got or kept != nets:
        out = MPP.refreshed(config)
        write_ranges(out, kept, f"{MPP.title}, from {source}\nwithout the {RELAY.title}.\n"
                                "An open from these addresses is Apple's prefetch (machine).")
        written.append((MPP, len(kept), out))
    return written


def _looks_like_relay_csv(text: str) -> bool:
    for line in text.splitlines()[:20]:
        if line.strip() and not line.startswith("#"):
            return line.count(",") >= 3
    return False


def stale_warning(path: Path) -> str:
    return (f"{path} is the iCloud Private Relay list written as Mail Privacy Protection ranges by "
            "an older refresh: it is not used (the shipped list is); run "
            "`trackrelay tracker refresh-apple-ranges`")
