"""Attempt budgets for password checks (SMTP AUTH and the sign-in page).

Two budgets at once: per user name (lower-cased, across every address) and per client network
(IPv4 /24, IPv6 /64). An attempt takes a slot in both *before* its password is checked and holds
it while the check runs, so simultaneous attempts cannot overrun a budget: once failures plus
attempts in flight reach it, further attempts are refused at once, without a check. When the
failures reach the budget the key is locked for ``backoff`` seconds, doubling with each further
lock up to ``backoff_max``; after a lock ends one more failure locks it again (for twice as long).
A key left alone for ``backoff_max`` seconds starts afresh. A success clears the user's failures
(not the network's: one's own good password must not buy guesses against others).

Both tables are LRU-bounded (``max_entries`` each): distinct names or networks cannot grow memory.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from typing import Callable

#: Keys kept per table: about 280 bytes each with a short name, 540 with the longest (MAX_NAME),
#: so a table stays under ~2.2 MB however many distinct names are tried. To push a key out, one
#: needs this many failures on other keys in between, which the per-network budget spreads over
#: MAX_ENTRIES / budget networks.
MAX_ENTRIES = 4096
MAX_NAME = 256


def network_of(ip: str) -> str:
    """The client network a budget is kept for: IPv4 /24, IPv6 /64 (IPv4-mapped as IPv4)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip[:64]
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network((addr, prefix), strict=False))


class _Entry:
    __slots__ = ("failures", "pending", "lockouts", "locked_until", "touched")

    def __init__(self, now: float):
        self.failures = self.pending = self.lockouts = 0
        self.locked_until = 0.0
        self.touched = now


class _Table:
    def __init__(self, limit: int, backoff: float, backoff_max: float, max_entries: int):
        self.limit, self.backoff, self.backoff_max = limit, backoff, max(backoff, backoff_max)
        self.max_entries = max_entries
        self.entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def delay(self, lockouts: int) -> float:
        return min(self.backoff_max, self.backoff * 2 ** min(lockouts, 40))

    def entry(self, key: str, now: float) -> _Entry:
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = _Entry(now)
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
            return e
        self.entries.move_to_end(key)
        if e.locked_until and now >= e.locked_until:
            quiet = now - e.locked_until
            e.locked_until = 0.0
            if quiet > self.backoff_max:
                e.failures = e.lockouts = 0
            else:
                e.failures = self.limit - 1  # one more failure locks it again, for twice as long
        elif not e.locked_until and not e.pending and now - e.touched > self.backoff_max:
            e.failures = e.lockouts = 0
        return e

    def refusal(self, e: _Entry, now: float) -> float | None:
        """Seconds to wait, or None when the attempt may go ahead."""
        if e.locked_until > now:
            return e.locked_until - now
        if e.failures + e.pending >= self.limit:
            return self.delay(e.lockouts)  # slots all held by attempts still being checked
        return None

    def failed(self, e: _Entry, now: float) -> float | None:
        e.pending -= 1
        e.failures += 1
        e.touched = now
        if e.failures >= self.limit and e.locked_until <= now:
            wait = self.delay(e.lockouts)
            e.locked_until = now + wait
            e.lockouts += 1
            return wait
        return e.locked_until - now if e.locked_until > now else None


class Attempt:
    """One password check in progress: it holds a slot in each budget until it ends."""

    __slots__ = ("_budgets", "_held", "_done")

    def __init__(self, budgets: "AttemptBudgets", held: list[tuple[_Table, _Entry, bool]]):
        self._budgets, self._held, self._done = budgets, held, False

    def failed(self) -> int | None:
        """Count the failure; the Retry-After seconds if this failure locked a budget, else None."""
        if self._done:
            return None
        self._done = True
        now = self._budgets.clock()
        waits = [w for table, e, _ in self._held if (w := table.failed(e, now)) is not None]
        return _seconds(max(waits)) if waits else None

    def succeeded(self) -> None:
        if self._done:
            return
        self._done = True
        now = self._budgets.clock()
        for _, e, is_user in self._held:
            e.pending -= 1
            e.touched = now
            if is_user:
                e.failures = 0

    def released(self) -> None:
        """The check never ran (too busy): give the slots back uncounted."""
        if not self._done:
            self._done = True
            for _, e, _ in self._held:
                e.pending -= 1


class AttemptBudgets:
    """Per-user and per-network budgets; a limit of 0 turns that budget off."""

    def __init__(self, per_user: int, per_network: int, backoff: float, backoff_max: float,
                 max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.monotonic):
        self.users = _Table(per_user, backoff, backoff_max, max_entries)
        self.networks = _Table(per_network, backoff, backoff_max, max_entries)
        self.clock = clock

    def begin(self, name: str, ip: str) -> Attempt | int:
        """An Attempt holding a slot in each budget, or the seconds to wait (nothing is checked)."""
        now = self.clock()
        wanted = []
        if self.users.limit > 0:
            wanted.append((self.users, self.users.entry(name.lower()[:MAX_NAME], now), True))
        if self.networks.limit > 0:
            wanted.append((self.networks, self.networks.entry(network_of(ip), now), False))
        waits = [w for table, e, _ in wanted if (w := table.refusal(e, now)) is not None]
        if waits:
            return _seconds(max(waits))
        for _, e, _ in wanted:
            e.pending += 1
        return Attempt(self, wanted)

    def only_in_flight(self, name: str, ip: str) -> bool:
        """Is a refusal of ``begin`` only because every slot is held by checks still running (no
        budget locked, its failures under the limit)? Then the attempt may wait for a slot: a mail
        client opening several connections at once is no guesser."""
        now = self.clock()
        for table, key in ((self.users, name.lower()[:MAX_NAME]), (self.networks, network_of(ip))):
            e = table.entries.get(key)
            if table.limit > 0 and e is not None and (e.locked_until > now or e.failures >= table.limit):
                return False
        return True

    def __len__(self) -> int:
        return len(self.users) + len(self.networks)


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait))
