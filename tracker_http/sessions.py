"""Sign-in sessions for the pages (and the live stream): kept server-side (``storage.sessions``),
so that logout, a password change and removing the user end them; CSRF tokens bound to the
cookie; the cookie's ``Secure`` flag from the request's own scheme; the sign-in attempt budgets.

The cookie is a random token plus its MAC (garbage is refused without a database look-up); the
table keeps the token's SHA-256. The authentication middleware (``tracker_http.web``) looks the
cookie up once, for the routes that take a session (``lookup``). A session ends when
unused for ``api.session_idle_seconds``, after ``api.session_max_seconds`` in any case, and as
soon as its user is gone from the config or has another password hash.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from datetime import datetime, timedelta, timezone

from aiohttp import web

from core.attempts import AttemptBudgets
from core.config import Config, User
from core.links import Keyring
from storage import sessions as store
from tracker_http.netaddr import _in

COOKIE = "trackrelay_session"
#: The last-seen time is written at most this often per session (a page view is not a write).
TOUCH_SECONDS = 60.0
MAX_COOKIE = 200


def _mac(keyring_key: bytes, purpose: str, value: str) -> str:
    digest = hmac.digest(keyring_key, f"{purpose}:{value}".encode(), "sha256")
    return base64.urlsafe_b64encode(digest[:24]).decode().rstrip("=")


def password_tag(user: User) -> str:
    """Changes when the user's password hash does: a new password ends the old sessions."""
    return hashlib.sha256(f"trackrelay-session:{user.password_hash}".encode()).hexdigest()


def _token(keyring: Keyring, cookie: str | None) -> str | None:
    """The token of a well-formed cookie with a good MAC, else None."""
    if not cookie or cookie.count(".") != 1 or len(cookie) > MAX_COOKIE:
        return None
    token, sig = cookie.split(".")
    if not any(hmac.compare_digest(_mac(k, "session", token), sig) for k in keyring.keys):
        return None
    return token


def _sid(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc)


async def begin(ctx, user: User) -> str:
    """A new session for ``user``; its cookie value. Old expired sessions are purged meanwhile."""
    token = secrets.token_urlsafe(32)
    now = _now()
    api = ctx.config.api
    async with ctx.sessionmaker() as s:
        async with s.begin():
            await store.purge(s, now - timedelta(seconds=api.session_idle_seconds),
                              now - timedelta(seconds=api.session_max_seconds))
            await store.add(s, _sid(token), user.name, password_tag(user), now)
    return f"{token}.{_mac(ctx.keyring.keys[0], 'session', token)}"


async def lookup(ctx, cookie: str | None) -> User | None:
    """The user of a live session, or None (and an expired or orphaned session is deleted)."""
    token = _token(ctx.keyring, cookie)
    if token is None:
        return None
    sid = _sid(token)
    now = _now()
    api = ctx.config.api
    async with ctx.sessionmaker() as s:
        async with s.begin():
            row = await store.get(s, sid)
            if row is None:
                return None
            user = ctx.config.user(row.user)
            if (user is None or not hmac.compare_digest(row.password_tag, password_tag(user))
                    or now - row.last_seen_at > timedelta(seconds=api.session_idle_seconds)
                    or now - row.created_at > timedelta(seconds=api.session_max_seconds)):
                await store.remove(s, sid)
                return None
            if now - row.last_seen_at > timedelta(seconds=min(TOUCH_SECONDS, api.session_idle_seconds / 4)):
                await store.touch(s, sid, now)
    return user


async def end(ctx, cookie: str | None) -> None:
    """Logout: this session is gone, whatever cookie copies exist."""
    token = _token(ctx.keyring, cookie)
    if token is not None:
        async with ctx.sessionmaker() as s:
            async with s.begin():
                await store.remove(s, _sid(token))


async def end_user(ctx, name: str) -> int:
    """End every session of one user (say, after their password changed)."""
    async with ctx.sessionmaker() as s:
        async with s.begin():
            return await store.remove_user(s, name)


async def end_for_config(ctx, config: Config) -> int:
    """After a config reload: end the sessions of users it removed or gave another password."""
    async with ctx.sessionmaker() as s:
        async with s.begin():
            return await store.remove_except(s, {u.name: password_tag(u) for u in config.users})


def csrf_token(keyring: Keyring, cookie: str) -> str:
    return _mac(keyring.keys[0], "csrf", cookie)


def check_csrf(keyring: Keyring, cookie: str | None, token: str | None) -> bool:
    return bool(cookie and token) and any(
        hmac.compare_digest(_mac(k, "csrf", cookie), token) for k in keyring.keys)


def is_https(request: web.Request, trusted_proxies, public_url: str) -> bool:
    """Did the browser reach us over https? TLS on this connection; or X-Forwarded-Proto: https
    from a trusted proxy; or an https ``api.public_url``."""
    if request.transport is not None and request.transport.get_extra_info("sslcontext") is not None:
        return True
    proto = request.headers.get("X-Forwarded-Proto", "")
    if proto and trusted_proxies and _in(request.remote or "", trusted_proxies):
        return proto.split(",")[0].strip().lower() == "https"
    return public_url.startswith("https://")


def set_cookie(response: web.StreamResponse, value: str, secure: bool, max_age: float) -> None:
    response.set_cookie(COOKIE, value, max_age=int(max_age), httponly=True, samesite="Strict", secure=secure,
                        path="/")


def login_budgets(config: Config) -> AttemptBudgets:
    a = config.api
    return AttemptBudgets(a.login_max_failures, a.login_max_failures_network, a.login_backoff_seconds,
                          a.login_backoff_max_seconds)
