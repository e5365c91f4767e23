"""One running trackrelay: the roles it plays (relay, worker, tracker), started and stopped in order.

``serve`` runs all roles in one process; ``serve --only ROLE`` runs one of them (scale-out).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from relay import instrument
from relay.crm import CrmLogger, CrmLookup
from relay.inbound import InboundHandler, start_inbound
from relay.render import CopyRenderer
from relay.auth import Authenticator
from relay.smtp import HEADER_ROOM, SizeLimit, SubmissionHandler, start_submission
from relay.upstream import make_upstream
from relay.handoff import Handoff
from relay.maintenance import Maintenance
from relay.privacy import RetentionEraser
from relay.webhooks import WebhookSender
from relay.worker import DeliveryWorker, Renderer, plain_renderer
from storage import migrate
from storage.engine import make_engine, make_read_engine, make_sessionmaker
from storage.spool import spool_writer
from tracker_http.app import Tracker
from core.aio import cancel
from core.bus import EventBus
from core.config import Config, ConfigError
from core.links import keyring_for
from trackrelay.metrics import Metrics, MetricsServer

log = logging.getLogger("trackrelay")

#: What a SIGHUP cannot change: listeners, storage, keys, roles' wiring (named in the log).
_RESTART_KEYS = {
    "relay.listen": lambda c: c.relay.listen,
    "relay.inbound_listen": lambda c: c.relay.inbound_listen,
    "relay.hostname": lambda c: c.relay.hostname,
    "relay.tls_cert_file (on or off)": lambda c: bool(c.relay.tls_cert_file),
    "api.tls_cert_file (on or off)": lambda c: bool(c.api.tls_cert_file),
    "tracker.listen": lambda c: c.tracker.listen,
    "api.listen": lambda c: c.api.listen,
    "storage.url": lambda c: c.storage.url,
    "tracker.secret_keys": lambda c: c.tracker.secret_keys,
    "tracker.writer_process": lambda c: c.tracker.writer_process,
    "upstream": lambda c: c.upstream,
    "metrics.listen": lambda c: c.metrics.listen,
}

ROLES = ("relay", "worker", "tracker")


def _check_apple_ranges(config: Config) -> None:
    """Apple's lists (tracker_http.apple): the tracker reads the Mail Privacy Protection ranges
    (the refreshed file beside the database, else the shipped one) at start and on SIGHUP; the
    iCloud Private Relay list makes no hit machine, so the tracker never loads it (the refresh
    takes it out of the MPP list). Said here: an MPP file that is an older refresh's copy of the
    Private Relay list."""
    from tracker_http import apple
    stale = apple.stale_mpp_file(config)
    if stale:
        log.warning("%s", apple.stale_warning(stale))


def _check_certificates(new: Config, sections: tuple[str, ...]) -> None:
    """A reload's certificate pairs load (into a scratch context) before anything is taken from
    ``new``: a renewal gone wrong (a garbage file, a key of another certificate) is refused naming
    the file, and the running certificates, users and the rest stay as they were."""
    for section in sections:
        sec = getattr(new, section)
        if not sec.tls_cert_file:
            continue
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_verify_locations(cafile=sec.tls_cert_file)  # parses the certificates alone
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(new.source, f"{section}.tls_cert_file",
                              f"{sec.tls_cert_file} is not a PEM certificate ({e})") from None
        try:
            ctx.load_cert_chain(sec.tls_cert_file, sec.tls_key_file)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(new.source, f"{section}.tls_key_file",
                              f"{sec.tls_key_file} is not the PEM key of {sec.tls_cert_file} ({e})") from None


@dataclass
class Service:
    config: Config
    roles: tuple[str, ...] = ROLES
    render: Renderer = plain_renderer
    engine: AsyncEngine | None = None
    read_engine: AsyncEngine | None = None
    read_sessionmaker: async_sessionmaker | None = None
    sessionmaker: async_sessionmaker | None = None
    #: The worker role: its delivery lanes, the hand-off and lease renewer they deliver for, the
    #: maintenance (DSNs, purge) and retention erasure.
    worker: DeliveryWorker | None = None
    handoff: Handoff | None = None
    maintenance: Maintenance | None = None
    privacy: RetentionEraser | None = None
    handler: SubmissionHandler | None = None
    authenticator: Authenticator | None = None
    tracker: Tracker | None = None
    crm: CrmLogger | None = None
    webhooks: WebhookSender | None = None
    bus: EventBus = field(default_factory=EventBus)
    #: ``serve --metrics-listen``: overrides ``metrics.listen`` ("" or None: the config's).
    metrics_listen: str | None = None
    metrics: Metrics | None = None
    _metrics_server: MetricsServer | None = None
    _servers: list[asyncio.base_events.Server] = field(default_factory=list)
    _inbound_handlers: list = field(default_factory=list)
    _spool = None
    _lookup = None
    _size: SizeLimit | None = None
    _probe: asyncio.Task | None = None

    async def start(self) -> None:
        c = self.config
        self.engine = make_engine(c.storage.url)
        await migrate.upgrade(self.engine)
        self.sessionmaker = make_sessionmaker(self.engine)
        self.read_engine = make_read_engine(c.storage.url, self.engine)
        self.read_sessionmaker = make_sessionmaker(self.read_engine)
        self.metrics = Metrics(self)  # this service's own registry, never the global one
        keyring = None
        if "worker" in self.roles or "tracker" in self.roles or ("relay" in self.roles and c.relay.inbound_listen):
            # the inbound listener verifies the X-Trackrelay-Ref of our copies with it
            try:
                keyring, generated = keyring_for(c.tracker.secret_keys, c.storage.url,
                                                 allow_generate=set(self.roles) == set(ROLES))
            except ValueError as e:
                if "worker" in self.roles or "tracker" in self.roles:
                    raise ConfigError(c.source, "tracker.secret_keys", str(e)) from None
                log.warning("tracker.secret_keys not set: the inbound listener cannot verify our "
                            "X-Trackrelay-Ref and takes only Message-IDs as proof")
                generated = None
            if generated:
                log.info("tracker.secret_keys not set: signing with the generated key in %s", generated)
        if "tracker" in self.roles:
            _check_apple_ranges(c)
            self.tracker = Tracker(c, self.sessionmaker, keyring, self.bus, rewrite=instrument)
            self.tracker.ctx.service_metrics = self.metrics  # the API listener's /metrics shows it
            await self.tracker.start()
        if "worker" in self.roles:
            upstream = make_upstream(c.upstream, c.relay.hostname)
            self.render = CopyRenderer(c, keyring)
            self.handoff = Handoff(c, self.sessionmaker)
            self.worker = DeliveryWorker(c, self.sessionmaker, upstream, render=self.render,
                                         on_recorded=self.bus.notify, handoff=self.handoff)
            self.worker.on_attempt = self.metrics.on_attempt
            self.maintenance = Maintenance(c, self.sessionmaker, on_written=self.worker.wake)
            self.worker.on_bounced = self.maintenance.wake
            self.privacy = RetentionEraser(c, self.sessionmaker)
            self.worker.start()
            self.maintenance.start()
            self.handoff.start()
            self.privacy.start()
            self.crm = CrmLogger(c, self.sessionmaker)
            self.crm.start()
            self.webhooks = WebhookSender(c, self.sessionmaker, self.bus)
            self.webhooks.start()
            log.info("delivery worker started: upstream %s", upstream.describe())
        if "relay" in self.roles:
            self._spool = spool_writer(self.sessionmaker)
            self._spool.start()
            self._size = SizeLimit(c.relay.max_message_bytes)
            self._lookup = CrmLookup(c, self.read_sessionmaker)
            self._lookup.start()
            self.handler = SubmissionHandler(c, self._spool, on_accepted=self._accepted,
                                             crm_lookup=self._lookup, handoff=self.handoff)
            self.authenticator = Authenticator(c)
            server = await start_submission(c, self.handler, self.authenticator, self._size)
            self._servers.append(server)
            log.info("submission listener on %s", c.relay.listen)
            if c.relay.inbound_listen:
                inbound = InboundHandler(c, self.sessionmaker, on_events=self.bus.notify, keyring=keyring)
                self._inbound_handlers.append(inbound)
                self._servers.append(await start_inbound(c, inbound))
                log.info("inbound listener on %s", c.relay.inbound_listen)
        if "relay" in self.roles or "worker" in self.roles:
            self._probe = asyncio.create_task(self._probe_upstream_size())
        listen = self.metrics_listen or c.metrics.listen
        if listen:
            self._metrics_server = MetricsServer(self.metrics, listen)
            await self._metrics_server.start()
            log.info("metrics, readiness and liveness on %s (/metrics, /readyz, /healthz)", listen)

    def _accepted(self, logged: bool, handed: bool) -> None:
        self.bus.notify()
        if self.worker is not None and not handed:
            self.worker.wake()  # spooled as queued: the worker claims it from the database
        if logged and self.crm is not None:
            self.crm.wake()

    async def _probe_upstream_size(self) -> None:
        """Never accept more than the upstream advertises (its SIZE, asked once at start)."""
        upstream = make_upstream(self.config.upstream, self.config.relay.hostname)
        try:
            advertised = await asyncio.wait_for(upstream.advertised_size(), 15)
        except asyncio.TimeoutError:
            advertised = None
        if advertised and isinstance(self.render, CopyRenderer):
            self.render.upstream_size = advertised
        if advertised and self._size is not None and advertised - HEADER_ROOM < self._size.value:
            self._size.lower_to(advertised)
            log.info("upstream advertises SIZE %d: accepting at most %d octets (room for our headers)",
                     advertised, self._size.value)

    async def reload(self, new: Config) -> list[str]:
        """SIGHUP: take what can change while running from ``new`` (already validated) — users,
        passwords, API tokens, log keys, Never Log entries, webhooks, TLS certificates, the Apple
        ranges — without dropping a session. Returns what still needs a restart to change."""
        old = self.config
        restart = [key for key, get in _RESTART_KEYS.items() if get(old) != get(new)]
        _check_certificates(new, tuple(
            section for section, running in (("relay", self.handler and self.handler.tls),
                                             ("api", self.tracker and getattr(self.tracker, "api_tls", None)))
            if running is not None))
        if self.handler is not None and self.handler.tls is not None and new.relay.tls_cert_file:
            self.handler.tls.load_cert_chain(new.relay.tls_cert_file, new.relay.tls_key_file)
        self.config = new
        for part in (self.handler, self.authenticator, self._lookup, self.worker, self.handoff,
                     self.maintenance, self.privacy, self.crm, self.webhooks, self.render,
                     *self._inbound_handlers):
            if part is None:
                continue
            reconfigure = getattr(part, "reconfigure", None)
            if reconfigure is not None:
                reconfigure(new)
            elif hasattr(part, "config"):
                part.config = new
            elif hasattr(part, "_config"):
                part._config = new
        if self.tracker is not None:
            _check_apple_ranges(new)
            await self.tracker.reconfigure(new)  # reads the Mail Privacy Protection ranges again
        return restart

    async def stop(self) -> None:
        """Stop listening, let sessions in DATA finish their commit, drain the worker, close."""
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        await cancel(self._probe)
        # A session that already read DATA is waiting on the spool writer: give it time to commit.
        await asyncio.sleep(0)
        if self._spool is not None:
            for _ in range(100):
                if self._spool._queue.empty():
                    break
                await asyncio.sleep(0.05)
            await self._spool.stop()
        if self.handler is not None:
            await self.handler.close_sessions()
        if self._lookup is not None:
            await self._lookup.stop()
        for handler in self._inbound_handlers:
            await handler.close_sessions()
        if self.worker is not None:
            self.maintenance.halt()  # woken with the lanes: they end after the step in hand
            self.privacy.halt()
            await self.worker.stop()  # the copies in hand delivered, their outcomes written
            await self.maintenance.stop()
            await self.privacy.stop()
            await self.handoff.stop()  # then the heartbeat ends and what is still held goes back
            await self.worker.close()
        if self.crm is not None:
            await self.crm.stop()
        if self.webhooks is not None:
            await self.webhooks.stop()
        if self.tracker is not None:
            await self.tracker.stop()
        if self.read_engine is not None and self.read_engine is not self.engine:
            await self.read_engine.dispose()
        if self.engine is not None:
            await self.engine.dispose()
