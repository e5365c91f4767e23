"""Which company an email domain belongs to: its registrable domain under the Public Suffix List
(``eu.acme.co.uk`` and ``acme.co.uk`` are one company, ``acme.co.uk``), IDNA 2008-normalised;
none for free-mail domains (the shipped ``data/freemail.txt`` plus the config's additions). The
list ships with the ``publicsuffixlist`` package: nothing is downloaded. Pure."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from importlib import resources

from core.idn import to_ascii_or_none


@functools.lru_cache(maxsize=1)
def _psl():
    from publicsuffixlist import PublicSuffixList
    return PublicSuffixList()


@functools.lru_cache(maxsize=1)
def free_mail() -> frozenset[str]:
    """The shipped free-mail domains (ASCII, lower case)."""
    text = resources.files("core").joinpath("data/freemail.txt").read_text("utf-8")
    return normalise_domains(line.split("#", 1)[0] for line in text.splitlines())


def normalise_domains(domains: Iterable[str]) -> frozenset[str]:
    return frozenset(d for d in (to_ascii_or_none(x) for x in domains if x and x.strip()) if d)


@functools.lru_cache(maxsize=4096)
def registrable(domain: str) -> str | None:
    """The registrable domain (eTLD+1) in ASCII form; the domain itself when it is a public suffix
    or under an unknown one; None when it is not a domain."""
    ascii_domain = to_ascii_or_none(domain)
    if not ascii_domain or "." not in ascii_domain.strip("."):
        return None
    return _psl().privatesuffix(ascii_domain) or ascii_domain


def company_domain(domain: str, extra_free_mail: frozenset[str] = frozenset()) -> str | None:
    """The company's domain for an address at ``domain``, or None (free mail, or not a domain)."""
    ascii_domain = to_ascii_or_none(domain)
    reg = registrable(domain)
    if not ascii_domain or not reg:
        return None
    free = free_mail() | extra_free_mail
    if ascii_domain in free or reg in free:
        return None
    return reg
