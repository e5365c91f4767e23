"""Refreshing the Apple Mail Privacy Protection egress ranges (``trackrelay tracker refresh-apple-ranges``).

Apple publishes the egress ranges of its privacy proxies as CSV (``prefix,country,region,city,``);
the first field of each line is a network. The refreshed list is written beside the database and
the tracker prefers it to the copy shipped with the package.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import aiohttp

APPLE_EGRESS_URL = "https://mask-api.icloud.com/egress-ip-ranges.csv"


def parse_ranges(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        field = line.split("#", 1)[0].split(",", 1)[0].strip()
        if not field:
            continue
        try:
            out.append(str(ipaddress.ip_network(field, strict=False)))
        except ValueError:
            continue
    return out


async def fetch(url: str, timeout: float = 120) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.get(url) as r:
            r.raise_for_status()
            return await r.text()


def write_ranges(path: Path, networks: list[str], source: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"# Apple privacy proxy egress ranges, from {source}\n" + "\n".join(networks) + "\n")
    os.replace(tmp, path)
