"""Byte-level header work on a raw RFC 5322 message: find, read, remove and add header fields
without re-serializing anything else (the body and every other header stay byte-identical).

Pure functions, bytes in and bytes out.
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from dataclasses import dataclass
from email import errors
from email.headerregistry import HeaderRegistry
from email.utils import getaddresses

_LINE_ENDS = re.compile(rb"\r\n|\r|\n")


def normalize_crlf(raw: bytes) -> bytes:
    """Bare CR or LF become CRLF (the upstream would do the same); CRLF stays."""
    pairs = raw.count(b"\r\n")
    if raw.count(b"\r") == pairs and raw.count(b"\n") == pairs:
        return raw  # every CR starts a CRLF and every LF ends one (three scans, no copies)
    return _LINE_ENDS.sub(b"\r\n", raw)


@dataclass(frozen=True)
class Field:
    name: str  # lower-cased
    start: int  # offset of the field's first byte
    end: int  # offset just past its final CRLF
    raw: bytes  # the whole field, folded lines and final CRLF included

    @property
    def value(self) -> str:
        """Unfolded value, 8-bit bytes kept as surrogates, RFC 2047 words left encoded."""
        _, _, value = self.raw.partition(b":")
        text = value.decode("utf-8", "surrogateescape")
        return re.sub(r"\r\n(?=[ \t])", "", text).strip()


def header_end(raw: bytes) -> int:
    """Offset where the body starts (just past the blank line), or len(raw) with no body."""
    if raw.startswith(b"\r\n"):
        return 2
    i = raw.find(b"\r\n\r\n")
    return len(raw) if i < 0 else i + 4


def fields(raw: bytes) -> list[Field]:
    """The header fields in order. A line that is neither a field nor a continuation is kept
    as a nameless field so that nothing is lost when fields are removed around it."""
    end = header_end(raw)
    head = raw[:end]
    out: list[Field] = []
    pos = 0
    n = len(head)
    while pos < n:
        nl = head.find(b"\r\n", pos)
        line_end = n if nl < 0 else nl + 2
        if head[pos:line_end] == b"\r\n":
            break
        start = pos
        pos = line_end
        while pos < n and head[pos:pos + 1] in (b" ", b"\t"):
            nl = head.find(b"\r\n", pos)
            pos = n if nl < 0 else nl + 2
        chunk = head[start:pos]
        colon = chunk.find(b":")
        name = chunk[:colon].strip().lower().decode("latin-1") if colon > 0 else ""
        if name and not re.fullmatch(r"[!-9;-~]+", name):
            name = ""
        out.append(Field(name, start, pos, chunk))
    return out


def get(raw_or_fields: bytes | list[Field], name: str) -> str | None:
    fs = fields(raw_or_fields) if isinstance(raw_or_fields, bytes) else raw_or_fields
    name = name.lower()
    for f in fs:
        if f.name == name:
            return f.value
    return None


def count(fs: list[Field], name: str) -> int:
    return sum(1 for f in fs if f.name == name.lower())


def remove(raw: bytes, names: set[str]) -> bytes:
    """Remove every field with one of these (lower-case) names; all else byte-identical."""
    fs = fields(raw)
    doomed = [f for f in fs if f.name in names]
    if not doomed:
        return raw
    parts = []
    pos = 0
    for f in doomed:
        parts.append(raw[pos:f.start])
        pos = f.end
    parts.append(raw[pos:])
    return b"".join(parts)


def prepend(raw: bytes, *header_lines: bytes) -> bytes:
    """Add fields at the top (each given without its CRLF)."""
    return b"".join(line + b"\r\n" for line in header_lines) + raw


def insert_after_head(raw: bytes, *header_lines: bytes) -> bytes:
    """Add fields at the end of the header block."""
    end = header_end(raw)
    if end == len(raw) and not raw.endswith(b"\r\n\r\n"):
        # No body separator: the message is all header (or malformed). Add ours and a separator.
        sep = b"" if raw.endswith(b"\r\n") or not raw else b"\r\n"
        return raw + sep + b"".join(line + b"\r\n" for line in header_lines)
    body_sep = end - 2
    return raw[:body_sep] + b"".join(line + b"\r\n" for line in header_lines) + raw[body_sep:]


_UNSTORABLE = re.compile("[\ud800-\udfff\x00]")


def text(value: str) -> str:
    """A header value as text a database can store: raw 8-bit bytes (kept as surrogates by
    ``Field.value``) read as UTF-8, anything undecodable, lone surrogates and NULs as U+FFFD."""
    if value.isascii():
        return value.replace("\x00", "\ufffd")
    if not _has_lone_surrogate(value):
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return _UNSTORABLE.sub("\ufffd", value)


def _has_lone_surrogate(value: str) -> bool:
    """A surrogate that is not one of surrogateescape's (U+DC80-U+DCFF) cannot be encoded back."""
    return any("\ud800" <= c <= "\udfff" and not "\udc80" <= c <= "\udcff" for c in value)


_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")
_FOLDING_WHITESPACE = re.compile(r"[ \t\r\n]+")


def decoded(value: str | None) -> str:
    """Human text of a header value, never raising and always storable: RFC 2047 words decoded
    (whitespace between two of them dropped; an unknown charset or bad bytes read as UTF-8 with
    U+FFFD), raw 8-bit bytes read as UTF-8, and whatever still does not decode as U+FFFD."""
    if not value:
        return ""
    value = text(value)
    if "=?" not in value:
        return value
    out = []
    pos = 0
    previous_word_end = -1
    for mt in _ENCODED_WORD.finditer(value):
        word = _decode_word(mt)
        if word is None:  # not decodable: plain text
            continue
        gap = value[pos:mt.start()]
        if not (pos == previous_word_end and _FOLDING_WHITESPACE.fullmatch(gap)):
            out.append(gap)
        out.append(word)
        pos = previous_word_end = mt.end()
    out.append(value[pos:])
    return _UNSTORABLE.sub("\ufffd", "".join(out))


def _decode_word(mt: re.Match) -> str | None:
    charset, kind, payload = mt.group(1), mt.group(2).lower(), mt.group(3)
    try:
        if kind == "b":
            data = base64.b64decode(payload + "=" * (-len(payload) % 4))
        else:
            data = quopri.decodestring(payload.replace("_", " ").encode("ascii"), header=False)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        return None
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def addresses(value: str | None) -> list[str]:
    """The addr-specs of an address header, lower-cased; unparsable entries are dropped."""
    if not value:
        return []
    return [addr.lower() for _, addr in getaddresses([text(value)]) if "@" in addr]


_HEADERS = HeaderRegistry()


def mailboxes(value: str) -> list[str] | None:
    """The addr-specs of an address header as a modern parser (the email package's
    ``policy.default``) reads it, after RFC 2047 decoding and without comments; None when it is
    not a well-formed address list, or an entry has no domain."""
    try:
        header = _HEADERS("from", text(value))
    except Exception:
        return None
    if any(isinstance(d, errors.InvalidHeaderDefect) for d in header.defects):
        return None
    found = []
    for a in header.addresses:
        if not a.username or not a.domain:
            return None
        found.append(a.addr_spec)
    return found
