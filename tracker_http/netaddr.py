"""Client addresses: X-Forwarded-For believed only from trusted proxies; storage per privacy.store_ip."""

from __future__ import annotations

import bisect
import ipaddress
from functools import lru_cache
from pathlib import Path

from core.links import key_file_path

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

SHIPPED_APPLE_RANGES = Path(__file__).parent / "data" / "apple_mpp_ranges.txt"


#: The first line the refresh wrote before there were two lists (from the Private Relay list).
OLD_REFRESH_HEADER = "# Apple privacy proxy egress ranges, from "


def refreshed_mpp_path(config) -> Path:
    return key_file_path(config.storage.url).parent / SHIPPED_APPLE_RANGES.name


def written_by_old_refresh(path: Path) -> bool:
    """Whether ``path`` is the Private Relay list an older refresh wrote as MPP ranges."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(OLD_REFRESH_HEADER)
    except OSError:
        return False


def apple_ranges_path(config) -> Path:
    """The refreshed Mail Privacy Protection list beside the database if there is one, else the one
    shipped. A file an older refresh wrote there from the Private Relay list is not used: those
    ranges carry people's browsing (check-config and serve warn: ``tracker_http.apple.stale_mpp_file``)."""
    refreshed = refreshed_mpp_path(config)
    if refreshed.is_file() and not written_by_old_refresh(refreshed):
        return refreshed
    return SHIPPED_APPLE_RANGES


def networks(specs: tuple[str, ...] | list[str]) -> list[Network]:
    return [ipaddress.ip_network(s, strict=False) for s in specs]


def _in(ip: str, nets: list[Network]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in n for n in nets)


def client_ip(peer: str | None, forwarded_for: str | None, trusted: list[Network]) -> str:
    """The real client: walk X-Forwarded-For from the right while the hop is a trusted proxy."""
    ip = peer or ""
    if not forwarded_for or not trusted or not _in(ip, trusted):
        return ip
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return ip
        ip = hop
        if not _in(hop, trusted):
            return hop
    return ip


@lru_cache(maxsize=8192)
def stored_ip(ip: str, mode: str) -> str | None:
    """The IP as kept: full, truncated (IPv4 /24, IPv6 /48) or none."""
    if mode == "none" or not ip:
        return None
    if mode == "full":
        return ip
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False).network_address)


class RangeSet:
    """Many IPv4/IPv6 ranges with fast membership: merged into disjoint sorted runs, bisected."""

    def __init__(self, nets: list[Network]):
        self._runs: dict[int, tuple[list[int], list[int]]] = {}
        for version in (4, 6):
            spans = sorted((int(n.network_address), int(n.broadcast_address)) for n in nets if n.version == version)
            merged: list[list[int]] = []
            for a, b in spans:
                if merged and a <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            self._runs[version] = ([a for a, _ in merged], [b for _, b in merged])
        self._count = len(nets)
        self._seen: dict[str, bool] = {}  # recent answers: readers come back from one address

    def __len__(self) -> int:
        return self._count

    def __contains__(self, ip: str) -> bool:
        hit = self._seen.get(ip)
        if hit is None:
            if len(self._seen) > 8192:
                self._seen.clear()
            hit = self._seen[ip] = self._lookup(ip)
        return hit

    def _lookup(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        starts, ends = self._runs[addr.version]
        i = bisect.bisect_right(starts, int(addr)) - 1
        return i >= 0 and int(addr) <= ends[i]

    @classmethod
    def from_file(cls, path: Path) -> "RangeSet":
        nets = []
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            spec = line.split(",", 1)[0].strip()
            try:
                nets.append(ipaddress.ip_network(spec, strict=False))
            except ValueError:
                continue
        return cls(nets)
