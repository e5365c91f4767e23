"""Never Log entries: ``name@domain`` or ``*@domain`` (that domain only), case-insensitive, IDN
domains in their ASCII form (IDNA 2008 with UTS #46, core.idn: ``*@straße.de`` is
``*@xn--strae-oqa.de`` and matches ``x@straße.de`` and ``x@xn--strae-oqa.de``, never
``x@strasse.de``; entries stored before 2026-11 under IDNA 2003: ``matches_legacy``), at most
500 per list. Pure: used by the relay's policy, the CLI and
the API alike."""

from __future__ import annotations

import functools
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


#: The characters IDNA 2003 mapped away and IDNA 2008 keeps (UTS #46's deviation characters).
DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")


@functools.lru_cache(maxsize=4096)
def idna2003_form(domain: str) -> str | None:
    """The form entries before 2026-11 stored ``domain`` (ASCII, IDNA 2008) under, when it differs:
    for a domain with a deviation character, what Python's IDNA 2003 codec makes of it
    (``xn--strae-oqa.de``, i.e. ``straße.de``: ``strasse.de``); otherwise None."""
    if "xn--" not in domain:
        return None
    unicode_domain = idn.to_unicode(domain)
    if not DEVIATIONS.intersection(unicode_domain):
        return None
    try:
        legacy = unicode_domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    return legacy if legacy != domain else None


def matches(address: str, entries: set[str] | frozenset[str]) -> bool:
    """Is ``address`` on a list of normalised entries?"""
    if not entries:
        return False
    addr = normalise_address(address)
    domain = addr.rpartition("@")[2]
    return addr in entries or f"*@{domain}" in entries


def matches_legacy(address: str, legacy_entries: set[str] | frozenset[str]) -> bool:
    """Is ``address`` on a list of entries stored before IDNA 2008 (2026-11), read with the
    meaning they may have been typed with?

    Those entries hold what IDNA 2003 made of the typed domain, and the typed text was not kept:
    ``*@straße.de`` was stored as ``*@strasse.de``, exactly as a real ``*@strasse.de``. Here an
    address whose domain has a deviation character (``ß``, ``ς``, ZWJ, ZWNJ) also matches an entry
    under the form IDNA 2003 gave its domain (``x@straße.de`` matches ``*@strasse.de``); only in
    that direction, and only for such old entries: an entry made today under ``strasse.de`` means
    that domain alone (``matches``). Widening only: it keeps more mail out of the CRM, never less.
    Not wired yet: the lists (``storage.crm.never_log_lists``) do not tell old entries apart."""
    if matches(address, legacy_entries):
        return True
    addr = normalise_address(address)
    local, _, domain = addr.rpartition("@")
    legacy = idna2003_form(domain) if "xn--" in domain else None
    return legacy is not None and (f"{local}@{legacy}" in legacy_entries or f"*@{legacy}" in legacy_entries)
