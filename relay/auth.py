"""SMTP AUTH for the submission listener: PLAIN/LOGIN against the configured users.

Every attempt takes a slot in the attempt budgets (``core.attempts``: per user name across
all addresses, per client network) before its password is checked; a locked-out client gets
``454 4.7.0`` with no check at all, so the answer never tells whether the password was right.
An unknown user name costs the same hash as a known one (it is checked against a configured
user's hash and the result thrown away). The check runs in the password worker threads
(``core.passwords.CHECKER``), never on the event loop, when the SMTP class has the
``AsyncAuth`` mixin (aiosmtpd calls an ``authenticator`` synchronously).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from core.attempts import Attempt, AttemptBudgets
from core.config import Config, User
from core.passwords import CHECKER, Busy, Checker, hash_for, verify_password

log = logging.getLogger("trackrelay.relay")

LOCKED = "454 4.7.0 Too many failed authentication attempts, try again in {seconds} seconds"
BUSY = "454 4.7.0 Temporary authentication failure, try again in a few seconds"
#: Passwords that verified lately, remembered (as digests) so a client that opens a connection per
#: message does not cost a hash each time.
VERIFIED_CACHE = 1024

def budgets_for_relay(config: Config) -> AttemptBudgets:
    r = config.relay
    return AttemptBudgets(r.auth_max_failures, r.auth_max_failures_network, r.auth_backoff_seconds,
                          r.auth_backoff_max_seconds)


#: How long an attempt waits for a slot held by checks still running before it is refused.
SLOT_WAIT = 10.0


class Authenticator:
    """AUTH PLAIN/LOGIN against the configured users, within the attempt budgets."""

    def __init__(self, config: Config, checker: Checker = CHECKER):
        self._config = config
        self._checker = checker
        self.budgets = budgets_for_relay(config)
        #: Metrics: wrong names or passwords, budgets spent, attempts refused while locked.
        self.failures = self.lockouts = self.refused = 0
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        hash_for(config, "")  # any dummy hash made now, not during a client's attempt

    async def authenticate(self, server: SMTP, session: Session, mechanism: str,
                           auth_data: object) -> AuthResult:
        """The check, awaited: the password is verified in a worker thread. An attempt that finds
        every slot held by checks still running waits for one (up to ``SLOT_WAIT`` seconds)
        rather than being refused: simultaneous connections of one mail client are no attack,
        and the budget still counts each failure before the next check."""
        begun = self._begin(session, auth_data)
        deadline = time.monotonic() + SLOT_WAIT
        while isinstance(begun, AuthResult) and begun.message and isinstance(auth_data, LoginPassword) \
                and time.monotonic() < deadline \
                and self.budgets.only_in_flight(auth_data.login.decode("utf-8", "replace"), _ip(session)):
            await asyncio.sleep(0.02)
            begun = self._begin(session, auth_data)
        if isinstance(begun, AuthResult):
            return begun
        attempt, name, password = begun
        user, stored = hash_for(self._config, name)
        # Shielded: a client that hangs up mid-check still has its attempt counted.
        return await asyncio.shield(asyncio.ensure_future(self._verify(attempt, session, user, name, password,
                                                                       stored)))

    def __call__(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                 auth_data: object) -> AuthResult:
        """aiosmtpd's synchronous authenticator (an SMTP class without ``AsyncAuth``): the same
        budgets, but the hash is computed on the event loop."""
        begun = self._begin(session, auth_data)
        if isinstance(begun, AuthResult):
            return begun
        attempt, name, password = begun
        user, stored = hash_for(self._config, name)
        ok = self._cached(name, password, stored) or verify_password(password, stored)
        return self._outcome(attempt, session, user, name, password, stored, ok)

    def _begin(self, session: Session, auth_data: object) -> AuthResult | tuple[Attempt, str, str]:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        name = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "surrogateescape")
        begun = self.budgets.begin(name, _ip(session))
        if not isinstance(begun, Attempt):
            self.refused += 1
            return AuthResult(success=False, handled=False, message=LOCKED.format(seconds=begun))
        return begun, name, password

    async def _verify(self, attempt: Attempt, session: Session, user: User | None, name: str, password: str,
                      stored: str) -> AuthResult:
        if self._cached(name, password, stored):
            ok = True
        else:
            try:
                ok = await self._checker.check(password, stored)
            except Busy:
                attempt.released()
                return AuthResult(success=False, handled=False, message=BUSY)
            except BaseException:
                attempt.failed()
                raise
        return self._outcome(attempt, session, user, name, password, stored, ok)

    def _outcome(self, attempt: Attempt, session: Session, user: User | None, name: str, password: str,
                 stored: str, ok: bool) -> AuthResult:
        if ok and user is not None:
            attempt.succeeded()
            self._remember(name, password, stored)
            return AuthResult(success=True, auth_data=user.name)
        self.failures += 1
        locked = attempt.failed()
        if locked is not None:
            self.lockouts += 1
            log.warning("AUTH budget spent (a user name, or the network of %s): locked for %d s",
                        _ip(session), locked)
            return AuthResult(success=False, handled=False, message=LOCKED.format(seconds=locked))
        return AuthResult(success=False, handled=False)

    @staticmethod
    def _digest(name: str, password: str, stored: str) -> bytes:
        return hashlib.sha256("\0".join((name, password, stored)).encode("utf-8", "surrogatepass")).digest()

    def _cached(self, name: str, password: str, stored: str) -> bool:
        d = self._digest(name, password, stored)
        if d in self._verified:
            self._verified.move_to_end(d)
            return True
        return False

    def _remember(self, name: str, password: str, stored: str) -> None:
        self._verified[self._digest(name, password, stored)] = None
        while len(self._verified) > VERIFIED_CACHE:
            self._verified.popitem(last=False)


def _ip(session: Session) -> str:
    return session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)


_PENDING = AuthResult(success=False, handled=False)  # only ever compared by identity


class AsyncAuth:
    """A mixin for aiosmtpd's SMTP (``class RelaySMTP(AsyncAuth, SMTP)``): AUTH PLAIN and LOGIN
    are parsed by aiosmtpd as before, then the credentials go to ``Authenticator.authenticate``,
    awaited, instead of aiosmtpd's synchronous authenticator call."""

    _auth_pending: tuple[str, object] | None = None

    async def auth_PLAIN(self, _, args):
        return await self._awaited_auth(await super().auth_PLAIN(_, args))  # type: ignore[misc]

    async def auth_LOGIN(self, _, args):
        return await self._awaited_auth(await super().auth_LOGIN(_, args))  # type: ignore[misc]

    def _authenticate(self, mechanism: str, auth_data):
        if isinstance(getattr(self, "_authenticator", None), Authenticator):
            self._auth_pending = (mechanism, auth_data)
            return _PENDING
        return super()._authenticate(mechanism, auth_data)  # type: ignore[misc]

    async def _awaited_auth(self, result):
        if result is not _PENDING:
            return result
        assert self._auth_pending is not None
        mechanism, auth_data = self._auth_pending
        self._auth_pending = None
        authenticator = self._authenticator  # type: ignore[attr-defined]
        return await authenticator.authenticate(self, self.session, mechanism, auth_data)  # type: ignore[attr-defined]
