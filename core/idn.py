"""Internationalised domain names: IDNA 2008 with UTS #46 mapping (the ``idna`` package), the one
conversion used wherever a domain is compared or converted (click targets, Never Log entries and
addresses, internal domains, companies, envelope recipients).

Python's built-in ``"idna"`` codec is IDNA 2003: it maps ``straße.de`` to ``strasse.de``, another
domain. Browsers and registries follow IDNA 2008 with the UTS #46 non-transitional mapping, under
which ``straße.de`` is ``xn--strae-oqa.de``.

An ASCII domain without an ``xn--`` label is only lower-cased. Any other goes through
``idna.encode`` whole: its every label is checked (IDNA 2008 code points, hyphens, joiners, bidi,
at most 63 octets; an ``xn--`` label must decode to a valid one), so it is refused where a browser
is more lenient (emoji, ``_`` or ``ab--c`` beside a non-ASCII label): a refusal costs a click
count or a match, a wrong conversion would send someone elsewhere.
"""

from __future__ import annotations

import functools

import idna


class DomainError(ValueError):
    """A domain that IDNA 2008 cannot represent (str() says why; ``detail``: the idna package's
    reason alone)."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


@functools.lru_cache(maxsize=4096)
def _encode(domain: str) -> str:
    """``domain`` in ASCII, a trailing dot kept (also one UTS #46 maps to a dot, like ``。``)."""
    if domain.isascii() and "xn--" not in domain.lower():
        return domain.lower()
    try:
        return idna.encode(domain, uts46=True, transitional=False).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError) as e:
        raise DomainError(f"not a valid internationalised domain: {domain!r} ({e})", str(e)) from None


def to_ascii(domain: str) -> str:
    """The domain's ASCII (A-label) form, lower-cased, trailing dot removed; ``DomainError`` when
    it cannot be converted. ASCII input is only lower-cased (an existing ``xn--`` label is checked)."""
    return _encode(domain.strip().rstrip(".")).rstrip(".")


def to_ascii_or_none(domain: str) -> str | None:
    try:
        return to_ascii(domain)
    except DomainError:
        return None


def host_to_ascii(host: str) -> str:
    """A URL's host name (not an IP literal) in ASCII, as written otherwise: a trailing dot is part
    of the host (``example.com.`` is another origin than ``example.com``). ``DomainError`` when it
    cannot be converted."""
    return _encode(host)


def domain_key(domain: str) -> str:
    """The form in which two domains are compared: ASCII when it converts, else only lower-cased
    (a domain that cannot convert then equals only itself, as written)."""
    d = domain.strip().rstrip(".")
    try:
        return _encode(d).rstrip(".")
    except DomainError:
        return d.lower()


def address_key(address: str) -> str:
    """The form in which two addresses are compared: lower-cased, the domain by ``domain_key``."""
    local, at, domain = address.strip().rpartition("@")
    return f"{local.lower()}@{domain_key(domain)}" if at else address.strip().lower()


def to_unicode(domain: str) -> str:
    """The domain's Unicode (U-label) form for display; the input unchanged when it cannot be decoded."""
    try:
        return idna.decode(domain.strip().rstrip("."), uts46=True)
    except (idna.IDNAError, UnicodeError):
        return domain
