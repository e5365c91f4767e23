"""Password and API-token hashing: Argon2id for new passwords (scrypt hashes still verify), SHA-256
for random API tokens; and the one place password checks run: a small pool of worker threads,
never the event loop, with a bounded number waiting."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

#: OWASP's Argon2id minimum (19 MiB, 2 passes, 1 lane): about 30 ms on one core, which bounds how
#: fast anyone can guess and how much a burst of checks costs the relay.
ARGON2_TIME_COST, ARGON2_MEMORY_KIB, ARGON2_PARALLELISM = 2, 19456, 1
_HASHER = argon2.PasswordHasher(time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB,
                                parallelism=ARGON2_PARALLELISM, type=argon2.Type.ID)
_N, _R, _P = 2**14, 8, 1  # scrypt, for hash_scrypt only (tests of old configs)


def hash_password(password: str) -> str:
    """A new ``$argon2id$…`` hash (what `trackrelay hash-password` prints)."""
    return _HASHER.hash(password)


def hash_scrypt(password: str, *, salt: bytes | None = None, n: int = _N) -> str:
    """An scrypt hash in the old ``scrypt$N$r$p$salt$digest`` form: still verified, due for rehash."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=_R, p=_P, dklen=32,
                            maxmem=256 * 1024 * 1024)
    b64 = lambda b: base64.b64encode(b).decode().rstrip("=")  # noqa: E731
    return f"scrypt${n}${_R}${_P}${b64(salt)}${b64(digest)}"


def hash_problem(stored: str) -> str | None:
    """Why a configured password hash can never verify, or None."""
    if stored.startswith("$argon2"):
        try:
            argon2.extract_parameters(stored)
        except (InvalidHashError, ValueError):
            return "not a valid Argon2 hash"
        return None
    if stored.startswith("scrypt$"):
        parts = stored.split("$")
        if len(parts) != 6 or not all(p.isdigit() for p in parts[1:4]):
            return "not a valid scrypt hash"
        return None
    return "must be a hash from `trackrelay hash-password`"


def needs_rehash(stored: str) -> bool:
    """True for scrypt hashes and Argon2 hashes weaker than today's parameters."""
    if not stored.startswith("$argon2"):
        return True
    try:
        return _HASHER.check_needs_rehash(stored)
    except (InvalidHashError, ValueError):
        return True


def verify_password(password: str, stored: str) -> bool:
    """Blocking: run it through ``check_password`` (a worker thread), not on the event loop."""
    raw = password.encode("utf-8", "surrogateescape")  # an AUTH password need not be UTF-8
    if stored.startswith("$argon2"):
        try:
            return _HASHER.verify(stored, raw)
        except (VerifyMismatchError, VerificationError, InvalidHashError, ValueError):
            return False
    try:
        kind, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if kind != "scrypt":
            return False
        pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
        salt = base64.b64decode(pad(salt_b64))
        expected = base64.b64decode(pad(digest_b64))
        digest = hashlib.scrypt(raw, salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(expected),
                                maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)


# -- the checks, off the event loop -----------------------------------------------------------

#: Threads hashing at once: one core less than the machine has (at least one, at most four), so
#: a guessing client cannot take every core from the tracker and the relay.
CHECK_THREADS = max(1, min(4, (os.cpu_count() or 2) - 1))
#: Checks waiting for a thread, beyond which a new attempt is refused as busy (454 / 429).
MAX_WAITING = 64


class Busy(Exception):
    """Too many password checks already waiting: try again shortly."""


class Checker:
    """Password checks in ``CHECK_THREADS`` worker threads with at most ``MAX_WAITING`` queued."""

    def __init__(self, threads: int = CHECK_THREADS, max_waiting: int = MAX_WAITING):
        self._threads, self._max = threads, threads + max_waiting
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.pending = 0
        self.checks = 0  # checks run so far (in the threads)

    async def check(self, password: str, stored: str) -> bool:
        if self.pending >= self._max:
            raise Busy()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="trackrelay-pw")
        self.pending += 1
        self.checks += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, verify_password, password,
                                                                    stored)
        finally:
            self.pending -= 1


#: One pool per process: SMTP AUTH and the sign-in page share it (and its bound).
CHECKER = Checker()

_dummy_hash: str | None = None


def hash_for(config, name: str):
    """(the user or None, the hash to check the password against). An unknown name is checked
    against the first configured user's hash (or a random one) and the result thrown away, so
    that it costs the same as a known name: the time of an answer does not tell which names exist."""
    global _dummy_hash
    user = config.user(name)
    if user is not None:
        return user, user.password_hash
    if config.users:
        return None, config.users[0].password_hash
    if _dummy_hash is None:
        _dummy_hash = hash_password(secrets.token_urlsafe(16))
    return None, _dummy_hash


def new_api_token() -> tuple[str, str]:
    """A fresh API token and the ``api_token_hash`` to put in the config."""
    token = "trk_" + secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


#: The hash of the password in config.example.toml ("change-me-now"); `serve` warns while it is in use.
EXAMPLE_PASSWORD = "change-me-now"
EXAMPLE_PASSWORD_HASH = "scrypt$16384$8$1$dHJhY2tyZWxheS1leGFtcA$XPcWvFYSnnY2+4CQ/u7DdV/2oFbOrgpbbrOtcOL5mdQ"
