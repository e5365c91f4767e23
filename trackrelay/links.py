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

_SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _b64d(text: str) -> bytes:
    if not _B64URL.fullmatch(text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


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

    def _by_id(self, kid: str) -> bytes | None:
        return self._ids.get(kid)

    @functools.cached_property
    def signing_id(self) -> str:
        return key_id(self.keys[0])

    @functools.cached_property
    def _pads(self) -> dict[bytes, tuple]:
        """Per key, SHA-256 already fed with the HMAC inner and outer pads (RFC 2104), copied per
        signature: half the cost of ``hmac.digest``, which also gives up the GIL on every call
        (on a busy tracker the request loop then waits for the database thread to hand it back)."""
        pads = {}
        for key in self.keys:
            k = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
            pads[key] = (hashlib.sha256(bytes(b ^ 0x36 for b in k)), hashlib.sha256(bytes(b ^ 0x5C for b in k)))
        return pads

    def sign(self, payload: str, key: bytes | None = None) -> str:
        inner, outer = self._pads[key or self.keys[0]]
        h = inner.copy()
        h.update(payload.encode("ascii"))
        o = outer.copy()
        o.update(h.digest())
        return _b64e(o.digest()[:16])


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
    """The Click behind the part of a click URL after ``/c/``, or None if it does not verify."""
    parts = path_part.split(".")
    if len(parts) != 5 or not path_part.isascii():  # what we sign is ASCII; "²" is a digit too
        return None
    kid, token, index, target_b64, sig = parts
    key = keyring._by_id(kid)
    if key is None or not _SAFE_TOKEN.match(token) or not index.isdigit() or len(index) > 6:
        return None
    payload = path_part[:-len(sig) - 1]  # kid.token.index.target, as signed
    if not hmac.compare_digest(keyring.sign(payload, key), sig):
        return None
    try:
        target = _b64d(target_b64).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    if not is_http_url(target) or _CONTROL.search(target):
        return None
    return Click(token, int(index), target)


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
