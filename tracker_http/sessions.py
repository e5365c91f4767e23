"""Sign-in sessions for the pages (and the live stream): a signed, expiring cookie; CSRF tokens
bound to it; and the sign-in rate limit."""

from __future__ import annotations

import base64
import hmac
import secrets
import time
from collections import deque

from aiohttp import web

from trackrelay.config import Config, User
from trackrelay.links import Keyring

COOKIE = "trackrelay_session"
LIFETIME = 12 * 3600
LOGIN_WINDOW = 600.0
LOGIN_MAX_FAILURES = 5


def _mac(keyring_key: bytes, purpose: str, value: str) -> str:
    digest = hmac.digest(keyring_key, f"{purpose}:{value}".encode(), "sha256")
    return base64.urlsafe_b64encode(digest[:24]).decode().rstrip("=")


def issue(keyring: Keyring, user: str) -> str:
    payload = base64.urlsafe_b64encode(f"{user}|{int(time.time()) + LIFETIME}|{secrets.token_hex(8)}".encode()
                                       ).decode().rstrip("=")
    return f"{payload}.{_mac(keyring.keys[0], 'session', payload)}"


def verify(keyring: Keyring, cookie: str | None, config: Config) -> User | None:
    if not cookie or cookie.count(".") != 1 or len(cookie) > 500:
        return None
    payload, sig = cookie.split(".")
    if not any(hmac.compare_digest(_mac(k, "session", payload), sig) for k in keyring.keys):
        return None
    try:
        name, expiry, _ = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode().split("|")
    except (ValueError, UnicodeDecodeError):
        return None
    if int(expiry) < time.time():
        return None
    return config.user(name)


def csrf_token(keyring: Keyring, cookie: str) -> str:
    return _mac(keyring.keys[0], "csrf", cookie)


def check_csrf(keyring: Keyring, cookie: str | None, token: str | None) -> bool:
    return bool(cookie and token) and any(
        hmac.compare_digest(_mac(k, "csrf", cookie), token) for k in keyring.keys)


def set_cookie(response: web.StreamResponse, value: str, secure: bool) -> None:
    response.set_cookie(COOKIE, value, max_age=LIFETIME, httponly=True, samesite="Strict", secure=secure,
                        path="/")


class LoginLimiter:
    """Failed sign-ins per (address, user name): after five in ten minutes, wait."""

    def __init__(self) -> None:
        self._fails: dict[tuple[str, str], deque[float]] = {}

    def blocked(self, ip: str, name: str) -> bool:
        q = self._fails.get((ip, name.lower()))
        now = time.monotonic()
        while q and now - q[0] > LOGIN_WINDOW:
            q.popleft()
        return bool(q) and len(q) >= LOGIN_MAX_FAILURES

    def failed(self, ip: str, name: str) -> None:
        self._fails.setdefault((ip, name.lower()), deque()).append(time.monotonic())

    def succeeded(self, ip: str, name: str) -> None:
        self._fails.pop((ip, name.lower()), None)
