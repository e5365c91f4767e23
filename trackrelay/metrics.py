"""Prometheus metrics and readiness for every role, one registry per Service.

Never the global default registry: tests run several services in one process. Most figures are
counters the code keeps anyway (the handler's ``accepted``, the recorder's Stats, the
authenticator's failures), read by custom collectors at scrape time; what is a database query
(queue depth by status, CRM jobs, webhook backlog) runs at scrape time with a short timeout and is
cached for a few seconds, never per message. The only per-message work is the worker's attempt
histograms (one observation each).

Each role's ``/metrics``, ``/readyz`` and ``/healthz`` are served by :class:`MetricsServer` on
``metrics.listen`` (or ``serve --metrics-listen``); the API listener's ``/metrics`` shows the same
registry where the tracker runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from core.config import parse_hostport
from storage import stats

if TYPE_CHECKING:
    from trackrelay.service import Service

log = logging.getLogger("trackrelay.metrics")

#: How long a database figure (queue depth, CRM jobs, webhook backlog) is trusted before asking again.
CACHE_SECONDS = 5.0
#: How long a scrape or a readiness check waits for the database or the upstream.
CHECK_TIMEOUT = 2.0

ATTEMPT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
DELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 5 * 86400)

_INTEGRAL = re.compile(r"(?m)^([^#\n][^\n]* -?\d+)\.0$")


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("trackrelay")
    except Exception:  # noqa: BLE001 — not installed (a bare checkout): still serve the rest
        return "unknown"


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition, integral values written as integers (``1``, not ``1.0``) as the
    hand-written tracker metrics were: both forms are valid, and dashboards' tests read them."""
    return _INTEGRAL.sub(r"\1", generate_latest(registry).decode()).encode()


@dataclass
class _Cached:
    at: float = 0.0
    value: Any = None


@dataclass
class Metrics:
    """A Service's registry and what its collectors read."""

    service: "Service"
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=False))
    _db: _Cached = field(default_factory=_Cached)
    _db_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        r = self.registry
        self.attempt_seconds = Histogram(
            "trackrelay_delivery_attempt_seconds", "Time of one delivery attempt to the upstream, by outcome.",
            ["outcome"], buckets=ATTEMPT_BUCKETS, registry=r)
        self.delay_seconds = Histogram(
            "trackrelay_delivery_delay_seconds", "From acceptance (the 250) to the upstream's acceptance of the copy.",
            buckets=DELAY_BUCKETS, registry=r)
        self.attempts: dict[str, int] = {}
        r.register(_Collector(self))
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, …
        PlatformCollector(registry=r)  # python_info

    # -- worker hook: one call per attempt ---------------------------------------------------------

    def on_attempt(self, claimed, message, outcome, seconds: float) -> None:
        status = outcome.status
        self.attempts[status] = self.attempts.get(status, 0) + 1
        self.attempt_seconds.labels(status).observe(seconds)
        if status == "sent" and message is not None:
            from storage.models import utcnow
            self.delay_seconds.observe(max((utcnow() - message.accepted_at).total_seconds(), 0.0))

    # -- database figures, cached ------------------------------------------------------------------

    async def refresh(self) -> None:
        """Ask the database for what the scrape shows of it, unless asked within CACHE_SECONDS."""
        if time.monotonic() - self._db.at < CACHE_SECONDS:
            return
        async with self._db_lock:
            if time.monotonic() - self._db.at < CACHE_SECONDS:
                return
            try:
                value = await asyncio.wait_for(self._query(), CHECK_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 — a scrape shows the database as down
                log.debug("metrics: database figures unavailable: %s", exc)
                value = None
            self._db = _Cached(time.monotonic(), value)

    async def _query(self) -> dict:
        async with self.service.engine.connect() as conn:
            return {"queue": await stats.copies_by_status(conn),
                    "crm": await stats.crm_jobs_by_state(conn),
                    "webhooks": await stats.webhook_backlogs(conn)}

    # -- readiness ---------------------------------------------------------------------------------

    async def ready(self) -> dict[str, str]:
        """What is unreachable, by name (empty: ready). The database for every role; the
        upstream too for the worker."""
        problems: dict[str, str] = {}
        try:
            await asyncio.wait_for(self._ping_db(), CHECK_TIMEOUT)
        except Exception as exc:  # noqa: BLE001
            problems["database"] = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if "worker" in self.service.roles:
            problem = await upstream_problem(self.service.config.upstream.url)
            if problem:
                problems["upstream"] = problem
        return problems

    async def response(self) -> web.Response:
        """The /metrics answer, for a listener that does not import this module (the tracker's API)."""
        return await metrics_response(self)

    async def _ping_db(self) -> None:
        await stats.ping(self.service.engine)


async def upstream_problem(url: str) -> str | None:
    """Why the upstream cannot be reached now, or None: a TCP connection for smtp(s), a writable
    directory for maildir."""
    parts = urlsplit(url)
    if parts.scheme == "maildir":
        path = Path((parts.netloc + parts.path) or ".")
        base = path if path.exists() else path.parent
        return None if os.access(base, os.W_OK) else f"maildir {path} not writable"
    host = parts.hostname or "localhost"
    port = parts.port or (465 if parts.scheme == "smtps" else 25)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CHECK_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as exc:
        return f"{host}:{port}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__}"
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return None


class _Collector:
    """Everything read at scrape time from counters the roles keep."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        m, s = self.m, self.m.service
        info = InfoMetricFamily("trackrelay_build", "The running trackrelay.")
        info.add_metric([], {"version": _version(), "python": platform.python_version(),
                             "roles": ",".join(s.roles)})
        yield info
        yield GaugeMetricFamily("trackrelay_start_time_seconds", "When this process's service started (unix time).",
                                value=m.started)
        yield from self._relay(s)
        yield from self._worker(m, s)
        yield from self._tracker(s)
        yield from self._database(m)

    @staticmethod
    def _relay(s) -> Iterable:
        h = s.handler
        if h is None:
            return
        yield CounterMetricFamily("trackrelay_messages_accepted", "Messages accepted (250 after DATA).",
                                  value=h.accepted)
        data = CounterMetricFamily("trackrelay_smtp_data_replies", "Final replies to DATA, by reply code.",
                                   labels=["code"])
        replies = CounterMetricFamily("trackrelay_smtp_replies", "Every SMTP reply of the submission "
                                      "listener, by reply code (refusals are the 4xx and 5xx).", labels=["code"])
        for code, n in sorted(getattr(h, "data_replies", {}).items()):
            data.add_metric([code], n)
        for code, n in sorted(getattr(h, "replies", {}).items()):
            replies.add_metric([code], n)
        yield data
        yield replies
        yield from _batcher("trackrelay_spool_writer", "accepted messages", s._spool)
        a = s.authenticator
        if a is not None:
            yield CounterMetricFamily("trackrelay_auth_failures", "SMTP AUTH attempts with a wrong name or password.",
                                      value=getattr(a, "failures", 0))
            yield CounterMetricFamily("trackrelay_auth_lockouts", "SMTP AUTH budgets spent (a name or a network "
                                      "locked out).", value=getattr(a, "lockouts", 0))
            yield CounterMetricFamily("trackrelay_auth_refused_locked", "SMTP AUTH attempts refused at once "
                                      "(454) because a budget was spent.", value=getattr(a, "refused", 0))

    @staticmethod
    def _worker(m: Metrics, s) -> Iterable:
        w = s.worker
        if w is None:
            return
        att = CounterMetricFamily("trackrelay_delivery_attempts", "Delivery attempts, by outcome "
                                  "(sent, deferred, bounced).", labels=["outcome"])
        for outcome in sorted(set(m.attempts) | {"sent", "deferred", "bounced"}):
            att.add_metric([outcome], m.attempts.get(outcome, 0))
        yield att
        yield from _batcher("trackrelay_outcome_writer", "delivery outcomes", getattr(w, "_recorder", None))
        if s.crm is not None:
            yield CounterMetricFamily("trackrelay_crm_logged", "Messages logged to the CRM by this process.",
                                      value=s.crm.logged)
        if s.webhooks is not None:
            yield CounterMetricFamily("trackrelay_webhook_posts", "Events POSTed to webhooks by this process.",
                                      value=s.webhooks.sent)

    @staticmethod
    def _tracker(s) -> Iterable:
        t = s.tracker
        if t is None:
            return
        ctx = t.ctx
        st = ctx.recorder.stats
        req = ctx.metrics.requests
        # One series per request, none overlapping: "click" counts redirects only (before, it
        # counted the rejected ones too).
        routes = CounterMetricFamily("trackrelay_tracker_requests", "Requests to the public tracker, by route "
                                     "(pixel, click: redirected, click_rejected: bad signature).", labels=["route"])
        routes.add_metric(["pixel"], req["pixel"])
        routes.add_metric(["click"], req["click"] - req["click_rejected"])
        routes.add_metric(["click_rejected"], req["click_rejected"])
        yield routes
        by_class = getattr(st, "classified", None)
        if by_class:
            hits = CounterMetricFamily("trackrelay_tracker_hits", "Opens and clicks written, by type and "
                                       "classification.", labels=["type", "classification"])
            for (kind, cls), n in sorted(by_class.items()):
                hits.add_metric([kind, cls], n)
            yield hits
        for name, doc, value in (
                ("trackrelay_events_written", "Events written to the database.", st.written),
                ("trackrelay_event_batches", "Batches of events committed (written / batches: their size).",
                 st.batches),
                ("trackrelay_events_dropped", "Events lost because the buffer was full.", st.dropped),
                ("trackrelay_event_unknown_tokens", "Hits whose token the database does not know.",
                 st.unknown_tokens),
                ("trackrelay_event_write_failures", "Batches that failed to write and were kept.", st.failures),
                ("trackrelay_event_writer_restarts", "Event writer processes started again after one exited.",
                 st.writer_restarts)):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily("trackrelay_event_buffer_depth", "Events waiting in memory to be written "
                                "(the writer's backlog).", value=ctx.recorder.depth)

    @staticmethod
    def _database(m: Metrics) -> Iterable:
        value = m._db.value
        yield GaugeMetricFamily("trackrelay_database_up", "1 when the last scrape's queries answered.",
                                value=1 if value is not None else 0)
        if value is None:
            return
        q = GaugeMetricFamily("trackrelay_queue_depth", "Copies by status (queued, sending, deferred, sent, "
                              "bounced, held, …), all processes.", labels=["status"])
        for status, n in sorted(value["queue"].items()):
            q.add_metric([status], n)
        yield q
        crm = GaugeMetricFamily("trackrelay_crm_jobs", "CRM-logging jobs by state, all processes.",
                                labels=["state"])
        for state, n in sorted(value["crm"].items()):
            crm.add_metric([state], n)
        yield crm
        backlog = GaugeMetricFamily("trackrelay_webhook_backlog", "Events not yet delivered to the webhook.",
                                    labels=["webhook"])
        given = CounterMetricFamily("trackrelay_webhook_given_up", "Events given up after 24 hours of "
                                    "failures.", labels=["webhook"])
        delivered = CounterMetricFamily("trackrelay_webhook_delivered", "Events delivered to the webhook.",
                                        labels=["webhook"])
        for url, (n, g, d) in sorted(value["webhooks"].items()):
            label = _webhook_label(url)
            backlog.add_metric([label], n)
            given.add_metric([label], g)
            delivered.add_metric([label], d)
        yield backlog
        yield given
        yield delivered


def _batcher(prefix: str, what: str, b) -> Iterable:
    """A group-commit writer's backlog, batches and items (core.batcher.Batcher)."""
    if b is None:
        return
    yield GaugeMetricFamily(f"{prefix}_backlog", f"{what.capitalize()} waiting to be committed.",
                            value=b._queue.qsize())
    yield CounterMetricFamily(f"{prefix}_batches", f"Commits of {what} (items / batches: their size).",
                              value=b.batches)
    yield CounterMetricFamily(f"{prefix}_items", f"{what.capitalize()} committed.", value=b.items)


def _webhook_label(url: str) -> str:
    """A webhook's URL without its query or credentials (they may hold a secret)."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.hostname or ''}{':' + str(p.port) if p.port else ''}{p.path}"


# -- the listener ---------------------------------------------------------------------------------

async def metrics_response(metrics: Metrics) -> web.Response:
    await metrics.refresh()
    return web.Response(body=render(metrics.registry), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


class MetricsServer:
    """``/metrics``, ``/readyz`` (503 with what is unreachable) and ``/healthz`` (liveness only)."""

    def __init__(self, metrics: Metrics, listen: str):
        self.metrics = metrics
        self.listen = listen
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        host, port = parse_hostport(self.listen)
        await web.TCPSite(self._runner, host, port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        return await metrics_response(self.metrics)

    async def _readyz(self, request: web.Request) -> web.Response:
        problems = await self.metrics.ready()
        if problems:
            return web.json_response({"status": "unready", "unreachable": problems}, status=503)
        return web.json_response({"status": "ready"})

    @staticmethod
    async def _healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

