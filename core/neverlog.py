"""Never Log entries: ``name@domain`` or ``*@domain`` (that domain only), case-insensitive, IDN
domains in their ASCII form (IDNA 2008 with UTS #46, core.idn: ``*@straße.de`` is
``*@xn--strae-oqa.de`` and matches ``x@straße.de`` and ``x@xn--strae-oqa.de``, never
``x@strasse.de``), at most 500 per list. Pure: used by the relay's policy, the CLI and
the API alike."""

from __future__ import annotations

import re

from core import idn

MAX_ENTRIES = 500
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class EntryError(ValueError):
    pass


def normalise_domain(domain: str) -> str:
    try:
        ascii_domain = idn.to_ascii(domain)
    except idn.DomainError as e:
        raise EntryError(f"not a valid domain: {domain.strip()!r} ({e.detail})") from None
    labels = ascii_domain.split(".")
    if len(labels) < 2 or not all(_LABEL.match(lb) for lb in labels):
        raise EntryError(f"not a valid domain: {domain!r}")
    return ascii_domain


def normalise_address(address: str) -> str:
    """An address as compared: local part lower-cased, domain in IDNA ASCII."""
    local, _, domain = address.strip().rpartition("@")
    try:
        return f"{local.lower()}@{normalise_domain(domain)}"
    except EntryError:
        return address.strip().lower()


def normalise_entry(entry: str) -> str:
    """The canonical form of an entry, or EntryError saying what is wrong with it."""
    raw = entry
    entry = entry.strip()
    if not entry or any(c.isspace() for c in entry):
        raise EntryError(f"{raw!r}: an entry is name@domain or *@domain, without spaces")
    if entry.count("@") != 1:
        raise EntryError(f"{raw!r}: an entry is name@domain or *@domain")
    local, domain = entry.split("@")
    if not local or not domain:
        raise EntryError(f"{raw!r}: an entry is name@domain or *@domain")
    if local != "*" and ("*" in local or not _LOCAL.match(local)):
        raise EntryError(f"{raw!r}: the part before @ is a name or *")
    try:
        domain = normalise_domain(domain)
    except EntryError as e:
        raise EntryError(f"{raw!r}: {e}") from None
    return f"{local.lower()}@{domain}"


def matches(address: str, entries: set[str] | frozenset[str]) -> bool:
    """Is ``address`` on a list of normalised entries?"""
    if not entries:
        return False
    addr = normalise_address(address)
    domain = addr.rpartition("@")[2]
    return addr in entries or f"*@{domain}" in entries
