"""Signed tracking URLs, shared by the relay (which signs) and the tracker (which verifies).

Pixel:  {public_url}/o/{token}.gif
Click:  {public_url}/c/{kid}.{token}.{index}.{target}.{sig}

``target`` is the link's decoded href as UTF-8 in unpadded base64url; ``sig`` is the first 128
bits of HMAC-SHA256 over ``kid.token.index.target`` with the key named by ``kid`` (a short
fingerprint of the key), so keys can rotate: the first key signs, every key verifies. The redirect
needs no database, and any changed byte fails verification. Nothing in a URL reveals the
recipient's address: the token is random.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

from core import idn


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"trackrelay-kid:" + key).hexdigest()[:8]


@dataclass(frozen=True)
class Keyring:
    keys: tuple[bytes, ...]  # the first signs; all verify

    def __post_init__(self):
        if not self.keys:
            raise ValueError("a keyring needs at least one key")

    @classmethod
    def from_strings(cls, keys: tuple[str, ...] | list[str]) -> "Keyring":
        return cls(tuple(k.encode("utf-8") for k in keys))

    @functools.cached_property
    def _ids(self) -> dict[str, bytes]:
        return {key_id(k): k for k in reversed(self.keys)}

    @functools.cached_property
    def signing_id(self) -> str:
        return key_id(self.keys[0])

    @functools.cached_property
    def pads(self) -> dict[str, tuple]:
        """Per key id, SHA-256 already fed with the HMAC inner and outer pads (RFC 2104), copied
        per signature: half the cost of ``hmac.digest``, which also gives up the GIL on every call
        (on a busy tracker the request loop then waits for the database thread to hand it back)."""
        pads = {}
        for kid, key in self._ids.items():
            k = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
            pads[kid] = (hashlib.sha256(bytes(b ^ 0x36 for b in k)), hashlib.sha256(bytes(b ^ 0x5C for b in k)))
        return pads

    def sign(self, payload: str, key: bytes | None = None) -> str:
        return _b64e(mac(self.pads[key_id(key) if key else self.signing_id], payload.encode("ascii")))


def mac(pads: tuple, payload: bytes) -> bytes:
    """HMAC-SHA256 of ``payload`` from a key's pads (``Keyring.pads``), its first 128 bits."""
    inner, outer = pads
    h = inner.copy()
    h.update(payload)
    o = outer.copy()
    o.update(h.digest())
    return o.digest()[:16]


class Click(NamedTuple):
    token: str
    index: int
    target: str


def pixel_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/o/{token}.gif"


def encode_target(target: str) -> str:
    return _b64e(target.encode("utf-8", "surrogatepass"))


def click_url(public_url: str, keyring: Keyring, token: str, index: int, target: str) -> str:
    return signed_click(public_url.rstrip("/"), keyring, token, index, encode_target(target))


def signed_click(public_url: str, keyring: Keyring, token: str, index: int, target_b64: str) -> str:
    """The hot path of rendering: ``target_b64`` is computed once per message, not per copy."""
    payload = f"{keyring.signing_id}.{token}.{index}.{target_b64}"
    return f"{public_url}/c/{payload}.{keyring.sign(payload)}"


def verify_click(keyring: Keyring, path_part: str) -> Click | None:
    """The Click behind the part of a click URL after ``/c/``, or None if it does not verify.
    (The tracker's hot path: a redirect's whole budget is a few tens of microseconds.)"""
    parts = path_part.split(".")
    if len(parts) != 5 or not path_part.isascii():  # what we sign is ASCII; "²" is a digit too
        return None
    kid, token, index, target_b64, sig = parts
    pads = keyring.pads.get(kid)
    if pads is None or not index.isdigit() or len(index) > 6 or len(sig) != 22:
        return None
    signed = path_part.encode("ascii")
    expected = binascii.b2a_base64(mac(pads, signed[:-23]), newline=False)  # kid.token.index.target
    if not hmac.compare_digest(expected[:22].translate(_TO_URLSAFE), signed[-22:]):
        return None
    # From here on every part is as we signed it (a random token, base64url of the target).
    target = _target(target_b64)
    return None if target is None else _click((token, int(index), target))


_click = functools.partial(tuple.__new__, Click)  # Click(…) without its Python-level __new__


@functools.lru_cache(maxsize=4096)
def _target(target_b64: str) -> str | None:
    """A signed target decoded, if it is an http(s) URL without CR, LF or NUL. Cached: every copy
    of a message carries the same targets, so a campaign's clicks share a handful of them (and
    only text whose signature verified gets here: nobody else can fill the cache)."""
    try:
        b64 = target_b64.encode("ascii").translate(_FROM_URLSAFE)
        target = binascii.a2b_base64(b64 + b"=" * (-len(b64) % 4)).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    return target if is_http_url(target) and not _CONTROL.search(target) else None


_CONTROL = re.compile(r"[\r\n\x00]")


_HTTP_URL = re.compile(r"^\s*https?://[^/?#\s]", re.IGNORECASE)


def is_http_url(target: str) -> bool:
    return bool(_HTTP_URL.match(target))


class Unrepresentable(ValueError):
    """A target that no Location header can carry so that the browser opens what the link said
    (str() says why)."""


#: What the URL standard strips from both ends of an address: C0 controls and space.
_C0_SPACE = "".join(map(chr, range(0x21)))
_CTL = re.compile(r"[\x00-\x1f\x7f]")
#: Scheme, authority (after any run of slashes and backslashes), the rest: as the URL standard
#: splits a special URL.
_SPLIT = re.compile(r"(https?:)[/\\]*([^/\\?#]*)(.*)", re.IGNORECASE | re.DOTALL)
_PORT = re.compile(r"[0-9]*")
#: The URL standard's forbidden domain code points (C0 controls and DEL are refused before).
_FORBIDDEN_IN_HOST = re.compile(r"[ #%/:<>?@\[\\\]^|]")
#: Every printable ASCII character: kept as written (``%`` too, so an existing %XX stays).
_PRINTABLE = "".join(map(chr, range(0x20, 0x7f)))


def to_uri(target: str) -> str:
    """The ASCII form of a link's target for a Location header, which a browser opens as exactly
    the URL it would have opened from the link; ``Unrepresentable`` when there is none.

    Parsed as the URL standard parses an http(s) URL (leading and trailing C0 controls and spaces
    dropped, the authority up to the first ``/``, ``\\``, ``?`` or ``#``, userinfo up to its last
    ``@``). The host: an IPv6 literal must parse and keeps its brackets; a name goes through IDNA
    2008 with the UTS #46 non-transitional mapping after percent-decoding, must not then hold a
    forbidden code point, and one ending in a number must be a valid IPv4 address. The port, as
    written, must be decimal and at most 65535. Userinfo, path, query and fragment keep every ASCII
    character as written (an existing %XX too) and percent-encode the rest as UTF-8: every
    encode set of the URL standard encodes all non-ASCII, and ASCII is left for the browser to
    treat as it treats the link (browsers differ among themselves there: ``^``, ``{``, ``'``).
    An ASCII target that is valid comes back byte for byte.

    Refused: control characters inside (a tab or a line break, which browsers drop, cannot go
    into a header as written), text that is not valid Unicode, and any host, port or IPv6 literal
    that a browser would refuse or that IDNA 2008 does not allow (e.g. emoji)."""
    uri, reason = _uri(target)
    if uri is None:
        raise Unrepresentable(reason)
    return uri


def representable(target: str, charset: str = "utf-8") -> str | None:
    """None when ``to_uri`` can carry ``target``, else the reason it cannot (for the recipient's
    reasons: such a link is left as it is, not wrapped). ``charset``: the HTML part's. A browser
    percent-encodes a non-ASCII query in the document's charset (UTF-8 for UTF-8 and UTF-16), so
    in a part of another charset such a link is refused too: the Location's query is UTF-8."""
    why = _uri(target)[1]
    if why is None and not target.isascii() and not _query_in_utf8(charset):
        query = target.partition("#")[0].partition("?")[2]
        if not query.isascii():
            why = f"a non-ASCII query in a {charset} part (a browser would encode it in {charset})"
    return why


@functools.lru_cache(maxsize=64)
def _query_in_utf8(charset: str) -> bool:
    try:
        name = codecs.lookup(charset).name
    except LookupError:
        return False
    return name in ("utf-8", "utf-16", "utf-16-le", "utf-16-be")


@functools.lru_cache(maxsize=4096)
def _uri(target: str) -> tuple[str | None, str | None]:
    if _plain(target):
        return target, None
    try:
        return _rebuild(target), None
    except Unrepresentable as e:
        return None, str(e)


#: The common link, which ``_rebuild`` would give back as it is: ASCII, an LDH (or ``_``) host name
#: with no userinfo, a decimal port, then printable ASCII. A shortcut (a message's every link is
#: checked once) that must agree with _rebuild: tests/test_idna.py holds them to it.
_PLAIN = re.compile(r"https?://([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?)(?::([0-9]{1,5}))?(?:[/?#][ -~]*)?",
                    re.IGNORECASE)


def _plain(target: str) -> bool:
    m = _PLAIN.fullmatch(target)
    if m is None or target[-1] == " ":
        return False
    host, port = m.groups()
    return ("xn--" not in host.lower() and _LAST_LABEL_NUMBER.search(host) is None
            and (port is None or int(port) <= 65535))


def _rebuild(target: str) -> str:
    s = target.strip(_C0_SPACE)
    if _CTL.search(s) or _CONTROL.search(target):  # the tracker refuses CR, LF and NUL anywhere
        raise Unrepresentable("a control character (tab, line break) inside the address")
    m = _SPLIT.match(s)
    if m is None or not is_http_url(s):
        raise Unrepresentable("not an http(s) address")
    scheme, authority, rest = m.groups()
    at = authority.rfind("@")
    hostport = authority[at + 1:] if at >= 0 else authority
    if "[" in hostport:  # a colon inside brackets does not start the port
        inside, colon = False, -1
        for i, c in enumerate(hostport):
            if c == "[":
                inside = True
            elif c == "]":
                inside = False
            elif c == ":" and not inside:
                colon = i
                break
    else:
        colon = hostport.find(":")
    host = hostport if colon < 0 else hostport[:colon]
    if colon >= 0:
        port = hostport[colon + 1:]
        if not _PORT.fullmatch(port):
            raise Unrepresentable("the port is not a number")
        if port and int(port) > 65535:
            raise Unrepresentable(f"port {int(port)} is out of range")
    host_ascii = _host(host)
    if s.isascii():
        return s
    try:
        userinfo = _pct(authority[:at + 1])
        rest = _pct(rest)
    except UnicodeEncodeError:
        raise Unrepresentable("not valid Unicode (a lone surrogate)") from None
    return f"{scheme}//{userinfo}{host_ascii}{hostport[len(host):]}{rest}"


def _pct(text: str) -> str:
    return text if text.isascii() else quote(text, safe=_PRINTABLE)


def _host(host: str) -> str:
    """The host in ASCII (an ASCII host as written); Unrepresentable when a browser would refuse it
    or IDNA 2008 does not allow it."""
    if not host:
        raise Unrepresentable("no host")
    if host.startswith("["):
        inner = host[1:-1]
        if not host.endswith("]") or "%" in inner or not inner.isascii():
            raise Unrepresentable("not a valid IPv6 address")
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise Unrepresentable("not a valid IPv6 address") from None
        return host
    try:
        name = unquote_to_bytes(host).decode("utf-8") if "%" in host else host
    except UnicodeError:
        raise Unrepresentable("the host is not valid UTF-8 once percent-decoded") from None
    try:
        name = idn.host_to_ascii(name)
    except idn.DomainError as e:
        raise Unrepresentable(f"the host is not valid under IDNA 2008 ({e.detail})") from None
    except UnicodeError:
        raise Unrepresentable("not valid Unicode (a lone surrogate)") from None
    if not name or _CTL.search(name) or _FORBIDDEN_IN_HOST.search(name):
        raise Unrepresentable("a character that cannot be in a host")
    if _ends_in_number(name) and not _ipv4(name):
        raise Unrepresentable("not a valid IPv4 address")
    return host if host.isascii() and "%" not in host else name


def _ipv4_number(part: str) -> int | None:
    """The URL standard's IPv4 number parser: decimal, 0x hex or 0-prefixed octal; None if invalid."""
    radix = 10
    if part[:2] in ("0x", "0X"):
        part, radix = part[2:], 16
    elif len(part) > 1 and part[0] == "0":
        part, radix = part[1:], 8
    if not part:
        return 0
    digits = "0123456789abcdef"[:radix]
    if not all(c in digits for c in part.lower()):
        return None
    return int(part, radix)


def _ends_in_number(name: str) -> bool:
    """The URL standard's "ends in a number": the last label (a trailing dot aside) is decimal
    digits or 0x hex, so the host must be an IPv4 address."""
    return _LAST_LABEL_NUMBER.search(name) is not None


_LAST_LABEL_NUMBER = re.compile(r"(?:^|\.)(?:[0-9]+|0[xX][0-9A-Fa-f]*)\.?\Z")


def _ipv4(name: str) -> bool:
    """Is this host, which ends in a number, a valid IPv4 address for the URL standard?"""
    parts = name.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    if len(parts) > 4 or "" in parts:
        return False
    numbers = [_ipv4_number(p) for p in parts]
    if None in numbers or any(n > 255 for n in numbers[:-1]):
        return False
    return numbers[-1] < 256 ** (5 - len(numbers))


def load_or_create_key_file(path: Path) -> str:
    """The generated single-process key (tracker.secret_keys unset): created once, mode 0600."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def key_file_path(storage_url: str) -> Path:
    """Where a single `serve` keeps its generated key: beside the SQLite database."""
    if storage_url.startswith("sqlite"):
        db = storage_url.split(":///", 1)[1] if ":///" in storage_url else "trackrelay.db"
        return Path(db).expanduser().resolve().parent / "trackrelay.key"
    return Path("trackrelay.key").resolve()


def keyring_for(secret_keys: tuple[str, ...], storage_url: str, allow_generate: bool) -> tuple[Keyring, Path | None]:
    """The configured keys, or the generated one (returned with its path, to be announced)."""
    if secret_keys:
        return Keyring.from_strings(secret_keys), None
    if not allow_generate:
        raise ValueError("tracker.secret_keys must be configured for --only roles (every process "
                         "must sign and verify with the same keys)")
    path = key_file_path(storage_url)
    return Keyring.from_strings([load_or_create_key_file(path)]), path
