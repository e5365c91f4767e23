"""SMTP AUTH for the submission listener: PLAIN/LOGIN against the configured users."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from relay import replies
from trackrelay.config import Config
from trackrelay.passwords import verify_password

log = logging.getLogger("trackrelay.relay")

LOCKOUT_WINDOW = 600.0


class Authenticator:
    """AUTH PLAIN/LOGIN against the configured users, with a lockout per (address, user name)."""

    def __init__(self, config: Config):
        self._config = config
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._locked_until: dict[tuple[str, str], float] = {}
        self._verified: set[bytes] = set()  # digests of (user, password, hash) that verified

    def locked(self, ip: str, name: str) -> bool:
        until = self._locked_until.get((ip, name.lower()))
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._locked_until[(ip, name.lower())]
            self._failures.pop((ip, name.lower()), None)
            return False
        return True

    def __call__(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                 auth_data: object) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        name = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        ip = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        if self.locked(ip, name):
            return AuthResult(success=False, handled=False, message=replies.AUTH_LOCKED)
        user = self._config.user(name)
        if user is not None and self._check(name, password, user.password_hash):
            self._failures.pop((ip, name.lower()), None)
            return AuthResult(success=True, auth_data=user.name)
        key = (ip, name.lower())
        now = time.monotonic()
        window = self._failures.setdefault(key, deque())
        window.append(now)
        while window and now - window[0] > LOCKOUT_WINDOW:
            window.popleft()
        if len(window) >= self._config.relay.auth_max_failures > 0:
            self._locked_until[key] = now + LOCKOUT_WINDOW
            log.warning("AUTH lockout for a user name from %s after %d failures", ip, len(window))
            return AuthResult(success=False, handled=False, message=replies.AUTH_LOCKED)
        return AuthResult(success=False, handled=False)

    def _check(self, name: str, password: str, stored: str) -> bool:
        # scrypt costs tens of milliseconds on the event loop: remember what verified before.
        digest = hashlib.sha256("\0".join((name, password, stored)).encode("utf-8", "surrogatepass")).digest()
        if digest in self._verified:
            return True
        if verify_password(password, stored):
            self._verified.add(digest)
            return True
        return False
