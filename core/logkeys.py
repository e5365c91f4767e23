"""Inbound log keys: the secret part of ``log+<log_key>@<relay.hostname>``.

A log key is the only thing between the world's mail servers and a user's timeline, so it must
not be guessable: at least ``MIN_BITS`` (128) bits as its characters can carry. The strength of a
string cannot be measured, only bounded from above; ``strength_bits`` takes the length times
log2 of the alphabet its character classes span (hex digits 16, digits 10, lower or upper case
letters 26 each, ``-``/``_``/``.``/``+`` 4, other punctuation 28), so 32 hex digits (128) or 22
base64url characters (≈ 131) pass and ``"b1"`` (≈ 10) does not. A key of few distinct characters
(``"aaaa…"``) is refused whatever its length.

``new_log_key`` makes 32 characters of lower-case base32 (160 random bits): safe in a local part,
and unchanged by a mail system that lower-cases addresses.
"""

from __future__ import annotations

import base64
import math
import re
import secrets

MIN_BITS = 128
#: Fewer distinct characters than this is not a random key, whatever its length.
MIN_DISTINCT = 8
#: What the local part can carry without quoting (RFC 5322 atext, less what mail systems mangle).
_ALLOWED = re.compile(r"[A-Za-z0-9._+-]+")


def new_log_key() -> str:
    """A fresh log key: 160 random bits as 32 lower-case base32 characters."""
    return base64.b32encode(secrets.token_bytes(20)).decode("ascii").lower()


def strength_bits(key: str) -> float:
    """An upper bound of the key's entropy in bits (see the module docstring)."""
    if not key:
        return 0.0
    if re.fullmatch(r"[0-9a-f]+", key) or re.fullmatch(r"[0-9A-F]+", key):
        alphabet = 16 if not key.isdigit() else 10
    else:
        alphabet = 0
        alphabet += 10 if re.search(r"[0-9]", key) else 0
        alphabet += 26 if re.search(r"[a-z]", key) else 0
        alphabet += 26 if re.search(r"[A-Z]", key) else 0
        alphabet += 4 if re.search(r"[-_.+]", key) else 0
        alphabet += 28 if re.search(r"[^0-9A-Za-z._+-]", key) else 0
    return len(key) * math.log2(max(alphabet, 2))


def problem(key: str) -> str | None:
    """Why this log key is refused, or None."""
    if not _ALLOWED.fullmatch(key):
        return "may hold only letters, digits and . _ + - (it is part of an email address)"
    bits = strength_bits(key)
    if bits < MIN_BITS:
        return (f"too weak: {len(key)} characters carry at most {bits:.0f} bits, at least {MIN_BITS} "
                "are required (`trackrelay new-log-key` prints one)")
    if len(set(key)) < MIN_DISTINCT:
        return (f"too weak: only {len(set(key))} distinct characters, not a random key "
                "(`trackrelay new-log-key` prints one)")
    return None
