"""The tracker role: both aiohttp listeners and the event recorder, started and stopped together."""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web
from sqlalchemy.ext.asyncio import async_sessionmaker

from tracker_http import classify
from tracker_http.api import create_api_app
from tracker_http.netaddr import RangeSet, networks
from tracker_http.public import create_public_app
from tracker_http.recorder import Recorder, SignedInIps
from tracker_http.state import Context
from trackrelay.bus import EventBus
from trackrelay.config import Config, parse_hostport
from trackrelay.links import Keyring, key_file_path

log = logging.getLogger("trackrelay.tracker")

SHIPPED_APPLE_RANGES = Path(__file__).parent / "data" / "apple_mpp_ranges.txt"
#: At stop, how long a request still being handled gets before it is cancelled (aiohttp's default,
#: 60 s, held `trackrelay serve`'s SIGTERM for two minutes behind one open live stream).
SHUTDOWN_SECONDS = 5.0


def apple_ranges_path(config: Config) -> Path:
    """The refreshed list beside the database if there is one, else the one shipped."""
    refreshed = key_file_path(config.storage.url).parent / "apple_mpp_ranges.txt"
    return refreshed if refreshed.is_file() else SHIPPED_APPLE_RANGES


class Tracker:
    def __init__(self, config: Config, sessionmaker: async_sessionmaker, keyring: Keyring,
                 bus: EventBus | None = None):
        signed_in = SignedInIps()
        bus = bus or EventBus()
        apple = RangeSet.from_file(apple_ranges_path(config))
        self.recorder = Recorder(config, sessionmaker, apple, signed_in, on_written=bus.notify)
        self.ctx = Context(config, keyring, sessionmaker, self.recorder,
                           networks(config.tracker.trusted_proxies), signed_in, bus)
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        classify.warm_up()
        self.recorder.start()
        c = self.ctx.config
        for app, listen in ((create_public_app(self.ctx), c.tracker.listen),
                            (create_api_app(self.ctx), c.api.listen)):
            runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                   shutdown_timeout=SHUTDOWN_SECONDS)
            await runner.setup()
            host, port = parse_hostport(listen)
            await web.TCPSite(runner, host, port, reuse_address=True).start()
            self._runners.append(runner)
        log.info("tracker on %s, API on %s", c.tracker.listen, c.api.listen)

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        await self.recorder.stop()
