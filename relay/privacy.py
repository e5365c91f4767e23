"""Retention erasure (``privacy.event_retention_days``): the raw IP address and user agent of
tracker events older than that are erased, once an hour, by a job of its own beside the worker."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from sqlalchemy.ext.asyncio import async_sessionmaker

from relay import maillog
from core.aio import finish
from storage.events import erase_raw_before
from storage.models import utcnow
from core.config import Config

log = logging.getLogger("trackrelay.worker")

#: Seconds between erasures.
ERASE_SECONDS = 3600


class RetentionEraser:
    def __init__(self, config: Config, sessionmaker: async_sessionmaker):
        self.config = config
        self.sessionmaker = sessionmaker
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def reconfigure(self, config: Config) -> None:
        self.config = config  # SIGHUP: a new event_retention_days counts from the next erasure

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="retention-erasure")

    def halt(self) -> None:
        self._stop.set()

    async def stop(self) -> None:
        self.halt()
        await finish(self._task)

    async def _run(self) -> None:
        last = 0.0
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            since = loop.time() - last
            if since > ERASE_SECONDS:
                try:
                    await self.erase_old_event_data()
                    last = loop.time()
                    since = 0.0
                except Exception as exc:
                    log.error("retention erasure failed: %s", maillog.error(exc))
                    since = ERASE_SECONDS - 30.0  # tried again in 30 s
            try:
                await asyncio.wait_for(self._stop.wait(), max(ERASE_SECONDS - since, 1.0))
            except asyncio.TimeoutError:
                pass

    async def erase_old_event_data(self) -> int:
        """Erase the raw data of events older than ``privacy.event_retention_days`` (0: kept)."""
        days = self.config.privacy.event_retention_days
        if not days:
            return 0
        async with self.sessionmaker() as session:
            async with session.begin():
                return await erase_raw_before(session, utcnow() - timedelta(days=days))
