"""Email addresses as compared across the relay, the inbound listener and the CRM: one canonical
form (local part quoted only when it must be, RFC 5321 §4.1.2), the forms a bounce may name the
same mailbox by, and the system senders (``MAILER-DAEMON``, ``postmaster``, the null sender) that
send bounces rather than conversations. Pure."""

from __future__ import annotations

import re

from core.idn import to_ascii_or_none, to_unicode

#: Local parts of the senders that send bounces (and never become contacts).
SYSTEM_LOCAL_PARTS = frozenset({"mailer-daemon", "mailer_daemon", "mailerdaemon", "mail-daemon", "maildaemon",
                                "postmaster"})

# A dot-atom (RFC 5322), with RFC 6531's non-ASCII characters: needs no quotes.
_DOT_ATOM = re.compile(r"^[\w!#$%&'*+/=?^`{|}~-]+(?:\.[\w!#$%&'*+/=?^`{|}~-]+)*$")


def unquote_local(local: str) -> str:
    """The local part's content: ``"a..b"`` → ``a..b`` (backslash escapes resolved)."""
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        return re.sub(r"\\(.)", r"\1", local[1:-1])
    return local


def quote_local(local: str) -> str:
    """The local part as written in an address: quoted only when it is not a dot-atom."""
    if _DOT_ATOM.match(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def canonical(address: str) -> str:
    """``<"John"@Example.COM>`` → ``john@example.com``; ``"neko....nyaan"@example.org`` keeps its
    quotes (without them it is not an address). Lower-cased; the domain as written."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower()
    return f"{quote_local(unquote_local(local))}@{domain.rstrip('.')}".lower()


def variants(address: str) -> set[str]:
    """Every lower-cased form under which the same mailbox may be stored or named: quoted and not,
    the domain as an A-label and a U-label."""
    address = address.strip().strip("<>").strip()
    local, at, domain = address.rpartition("@")
    if not at:
        return {address.lower()}
    content = unquote_local(local)
    locals_ = {local, content, quote_local(content), f'"{content}"'}
    domains = {domain.rstrip(".")}
    ascii_domain = to_ascii_or_none(domain)
    if ascii_domain:
        domains |= {ascii_domain, to_unicode(ascii_domain)}
    return {f"{lp}@{d}".lower() for lp in locals_ for d in domains}


#: Exchange's system mailbox, the sender of its NDRs (``MicrosoftExchange329e71ec88ae4615bbc36ab6ce41109e``).
_EXCHANGE_SYSTEM = re.compile(r"^microsoftexchange[0-9a-f]{32}$")


def is_system(address: str | None) -> bool:
    """MAILER-DAEMON@…, postmaster@…, Exchange's system mailbox and the null sender (``""``, ``<>``)."""
    bare = (address or "").strip().strip("<>").strip()
    local = unquote_local(bare.rpartition("@")[0]).lower()
    return not bare or local in SYSTEM_LOCAL_PARTS or bool(_EXCHANGE_SYSTEM.match(local))
