"""The tracker role: both aiohttp listeners and the event recorder, started and stopped together
(the recorder before the public listener listens, and after it has shut down: ``tracker_http.routes``)."""

from __future__ import annotations

import logging
import ssl

from aiohttp import web
from sqlalchemy.ext.asyncio import async_sessionmaker

from core.tls import server_context
from core.bus import EventBus
from core.config import Config, parse_hostport
from core.links import Keyring
from tracker_http.netaddr import RangeSet, apple_ranges_path, networks
from tracker_http.recorder import Recorder, SignedInIps
from tracker_http.routes import create_api_app, create_public_server, start_recorder, stop_recorder
from tracker_http.sessions import end_for_config
from tracker_http.state import Context, Rewrite
from tracker_http.writer import WriterClient

log = logging.getLogger("trackrelay.tracker")

#: At stop, how long a request still being handled gets before it is cancelled (aiohttp's default,
#: 60 s, held `trackrelay serve`'s SIGTERM for two minutes behind one open live stream).
SHUTDOWN_SECONDS = 5.0


def api_tls_context(config: Config) -> ssl.SSLContext | None:
    """``api.tls_cert_file``/``tls_key_file``: the API and pages over https on api.listen itself."""
    return server_context(config.api.tls_cert_file, config.api.tls_key_file)


class Tracker:
    def __init__(self, config: Config, sessionmaker: async_sessionmaker, keyring: Keyring,
                 bus: EventBus | None = None, *, metrics=None, rewrite: Rewrite | None = None):
        """``metrics``: the Service's registry (/metrics shows every role of the process);
        ``rewrite``: the relay's (``relay.instrument``), for the page of a recipient's copy."""
        signed_in = SignedInIps()
        bus = bus or EventBus()
        if config.tracker.writer_process:  # classification and writes in a child process
            self.recorder: Recorder | WriterClient = WriterClient(config, signed_in, on_written=bus.notify)
        else:
            apple = RangeSet.from_file(apple_ranges_path(config))
            self.recorder = Recorder(config, sessionmaker, apple, signed_in, on_written=bus.notify)
        self.ctx = Context(config, keyring, sessionmaker, self.recorder,
                           networks(config.tracker.trusted_proxies), signed_in, bus,
                           service_metrics=metrics, rewrite=rewrite)
        self._runners: list[web.BaseRunner] = []
        self._recording = False  # the recorder started and not stopped yet

    async def start(self) -> None:
        c = self.ctx.config
        self.api_tls = api_tls_context(c)
        start_recorder(self.ctx)
        self._recording = True
        for runner, listen, tls in (
                (web.ServerRunner(create_public_server(self.ctx), shutdown_timeout=SHUTDOWN_SECONDS),
                 c.tracker.listen, None),
                (web.AppRunner(create_api_app(self.ctx), access_log=None, handle_signals=False,
                               shutdown_timeout=SHUTDOWN_SECONDS), c.api.listen, self.api_tls)):
            await runner.setup()
            host, port = parse_hostport(listen)
            await web.TCPSite(runner, host, port, reuse_address=True, ssl_context=tls).start()
            self._runners.append(runner)
        log.info("tracker on %s, API on %s", c.tracker.listen, c.api.listen)

    async def reconfigure(self, config: Config) -> None:
        """A reload (SIGHUP): users, tokens and trusted proxies from ``config``; the sessions of
        users it removed or gave another password end; the Apple ranges are read again."""
        if getattr(self, "api_tls", None) is not None and config.api.tls_cert_file:
            self.api_tls.load_cert_chain(config.api.tls_cert_file, config.api.tls_key_file)
        self.ctx.config = config
        self.ctx.trusted_proxies = networks(config.tracker.trusted_proxies)
        if isinstance(self.recorder, Recorder):
            self.recorder.config = config
            self.recorder.apple = RangeSet.from_file(apple_ranges_path(config))
        else:
            self.recorder.reconfigure(config)
        ended = await end_for_config(self.ctx, config)
        if ended:
            log.info("reload ended %d page sessions of removed or changed users", ended)

    async def stop(self) -> None:
        for runner in self._runners:  # the public listener's first, then the recorder writes what it holds
            await runner.cleanup()
            if self._recording:
                self._recording = False
                await stop_recorder(self.ctx)
        self._runners.clear()
        if self._recording:  # the public listener never listened (start failed): the recorder still stops
            self._recording = False
            await stop_recorder(self.ctx)
