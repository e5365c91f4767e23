"""Password and API-token hashing: scrypt for passwords, SHA-256 for random API tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

_N, _R, _P = 2**14, 8, 1


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode().rstrip("=")  # noqa: E731
    return f"scrypt${_N}${_R}${_P}${b64(salt)}${b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if kind != "scrypt":
            return False
        pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
        salt = base64.b64decode(pad(salt_b64))
        expected = base64.b64decode(pad(digest_b64))
        digest = hashlib.scrypt(password.encode(), salt=salt, n=int(n), r=int(r), p=int(p),
                                dklen=len(expected), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)


def new_api_token() -> tuple[str, str]:
    """A fresh API token and the ``api_token_hash`` to put in the config."""
    token = "trk_" + secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


#: The hash of the password in config.example.toml ("change-me-now"); `serve` warns while it is in use.
EXAMPLE_PASSWORD = "change-me-now"
EXAMPLE_PASSWORD_HASH = "scrypt$16384$8$1$dHJhY2tyZWxheS1leGFtcA$XPcWvFYSnnY2+4CQ/u7DdV/2oFbOrgpbbrOtcOL5mdQ"
