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
import functools
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit


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


def to_uri(target: str) -> str:
    """An IRI in its URI form for Location: host in IDNA, other non-ASCII percent-encoded UTF-8."""
    if target.isascii():
        return target
    parts = urlsplit(target)
    host = parts.hostname or ""
    try:
        host_ascii = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        host_ascii = quote(host, safe="")
    netloc = host_ascii
    if parts.port:
        netloc += f":{parts.port}"
    if parts.username or parts.password:
        userinfo = quote(parts.username or "", safe="%!$&'()*+,;=")
        if parts.password:
            userinfo += ":" + quote(parts.password, safe="%!$&'()*+,;=")
        netloc = f"{userinfo}@{netloc}"
    keep = "%/:@!$&'()*+,;=?#[]~-._"
    return urlunsplit((parts.scheme, netloc, quote(parts.path, safe=keep), quote(parts.query, safe=keep),
                       quote(parts.fragment, safe=keep)))


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
