"""Group commit: many callers' items written in one batch, each caller answered when its batch is.

Concurrent SMTP sessions hand their accepted messages to one ``Batcher`` (storage.spool's spool
writer); the delivery worker its outcomes, the CRM look-ups their addresses. It writes everything
that is waiting in one flush (one transaction, one fsync), then answers each caller. While one
flush runs, the next batch gathers, so throughput grows with concurrency instead of fsyncs.

Generic: no project imports, no database. Which failures are one item's fault (``message_fault``)
is told by the exception's kind alone.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Generic, TypeVar

from core.aio import cancel

log = logging.getLogger("trackrelay.spool")

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Group commit: ``submit`` waits until its item is part of a flushed batch."""

    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]], max_batch: int = 256,
                 name: str = "batcher", linger: float = 0.0):
        self._flush = flush
        self._max = max_batch
        #: Seconds to wait for more items after the first (0: write at once). For writes nobody
        #: waits on, fewer and larger commits.
        self._linger = linger
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._name = name
        self._busy = False
        self.batches = 0
        self.items = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self, grace: float = 5.0) -> None:
        # Let a batch being written finish: cancelled mid-commit, the driver's thread would go on
        # after the event loop is gone. Waiting for the next item is safe to cancel.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while (self._busy or not self._queue.empty()) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await cancel(self._task)
        self._task = None
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("shutting down"))

    async def submit(self, item: T) -> R:
        return await self.submit_nowait(item)

    def submit_nowait(self, item: T) -> asyncio.Future[R]:
        """Queue the item now; the future is done once its batch is committed."""
        if self._task is None:
            raise RuntimeError(f"{self._name} is not running")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, fut))
        return fut

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            self._busy = True  # from here on stop() waits for this batch (lingering included)
            try:
                if self._linger and self._queue.qsize() < self._max:
                    await asyncio.sleep(self._linger)
                while len(batch) < self._max and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                items = [item for item, _ in batch]
                results = await self._flush(items)
            except asyncio.CancelledError:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(RuntimeError("shutting down"))
                raise
            except Exception as exc:
                if len(batch) > 1 and not transient(exc):
                    # One item's fault (a value the database refuses) must not fail the others:
                    # each is written alone, and only the one at fault learns it.
                    log.error("%s: commit of %d items failed (%s: %s); writing them one by one", self._name,
                              len(batch), type(exc).__name__, exc)
                    await self._one_by_one(batch)
                else:  # the database itself failed: every waiter learns it
                    log.error("%s: commit of %d items failed: %s: %s", self._name, len(batch),
                              type(exc).__name__, exc)
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                continue
            finally:
                self._busy = False
            self.batches += 1
            self.items += len(items)
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)


    async def _one_by_one(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        for item, fut in batch:
            try:
                (result,) = await self._flush([item])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not fut.done():
                    fut.set_exception(exc)
                continue
            self.batches += 1
            self.items += 1
            if not fut.done():
                fut.set_result(result)


def message_fault(exc: BaseException) -> bool:
    """Is the failure this message's own (a value the database or its driver refuses), so that
    writing it again fails the same way, rather than the database's (down, locked, missing a
    table, out of disk), which may pass later? The driver's own error is looked for through the
    wrappers (SQLAlchemy's ``orig``, the cause chain): asyncpg's client-side ``DataError`` for a
    value it cannot encode is a ``ValueError``."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, _VALUES) or _database_refused(cur):
            return True
        cur = getattr(cur, "orig", None) or cur.__cause__
        seen += 1
    return False


def transient(exc: BaseException) -> bool:
    """May the same message succeed later? Everything that is not the message's own fault."""
    return not message_fault(exc)


#: Python's own errors for a value that cannot be encoded or converted (asyncpg's client-side
#: ``DataError`` for a value it cannot encode is a ``ValueError``).
_VALUES = (UnicodeError, ValueError, TypeError, OverflowError)
#: SQLAlchemy's wrappers of the driver's DataError and IntegrityError (PEP 249's names for a
#: value the database refuses), recognised by class without importing SQLAlchemy here.
_REFUSALS = frozenset({("sqlalchemy.exc", "DataError"), ("sqlalchemy.exc", "IntegrityError")})


def _database_refused(exc: BaseException) -> bool:
    return any((k.__module__, k.__name__) in _REFUSALS for k in type(exc).__mro__)
