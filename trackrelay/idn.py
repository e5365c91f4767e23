"""Internationalised domain names: IDNA 2008 with UTS #46 mapping (the ``idna`` package), the one
conversion used wherever a domain is compared or converted (click targets, Never Log entries and
addresses, internal domains, companies, envelope recipients).

Python's built-in ``"idna"`` codec is IDNA 2003: it maps ``straße.de`` to ``strasse.de``, another
domain. Browsers and registries follow IDNA 2008 with the UTS #46 non-transitional mapping, under
which ``straße.de`` is ``xn--strae-oqa.de``.
"""

from __future__ import annotations

import functools

import idna


class DomainError(ValueError):
    """A domain that IDNA 2008 cannot represent (str() says why)."""


@functools.lru_cache(maxsize=4096)
def to_ascii(domain: str) -> str:
    """The domain's ASCII (A-label) form, lower-cased, trailing dot removed; ``DomainError`` when
    it cannot be converted. ASCII input is only lower-cased (an existing ``xn--`` label is checked)."""
    d = domain.strip().rstrip(".")
    if d.isascii() and "xn--" not in d.lower():
        return d.lower()
    try:
        return idna.encode(d, uts46=True, transitional=False).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as e:
        raise DomainError(f"not a valid internationalised domain: {domain!r} ({e})") from None


def to_ascii_or_none(domain: str) -> str | None:
    try:
        return to_ascii(domain)
    except DomainError:
        return None


def to_unicode(domain: str) -> str:
    """The domain's Unicode (U-label) form for display; the input unchanged when it cannot be decoded."""
    try:
        return idna.decode(domain.strip().rstrip("."), uts46=True)
    except (idna.IDNAError, UnicodeError):
        return domain
