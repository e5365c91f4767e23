"""What the tracker's handlers share: config, keys, the recorder, metrics (one ``web.AppKey``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from sqlalchemy.ext.asyncio import async_sessionmaker

from tracker_http.netaddr import Network
from tracker_http.recorder import Recorder, SignedInIps
from core.bus import EventBus
from core.config import Config
from core.links import Keyring

if TYPE_CHECKING:
    from tracker_http.writer import WriterClient


@dataclass
class Metrics:
    requests: Counter = field(default_factory=Counter)

    def inc(self, name: str) -> None:
        self.requests[name] += 1


class Rewrite(Protocol):
    """The relay's rewrite (``relay.instrument``: ``parse``, ``render``, ``Plan``), which the page
    of a recipient's copy runs again; the wiring (``trackrelay.service``) hands it over, as the
    tracker never imports the relay."""

    def parse(self, raw: bytes, public_url: str) -> Any: ...

    def render(self, parsed: Any, plan: Any) -> Any: ...

    def Plan(self, **fields: Any) -> Any: ...  # noqa: N802 - the dataclass it is


@dataclass
class Context:
    config: Config
    keyring: Keyring
    sessionmaker: async_sessionmaker
    recorder: "Recorder | WriterClient"
    trusted_proxies: list[Network]
    signed_in: SignedInIps
    bus: EventBus = field(default_factory=EventBus)
    metrics: Metrics = field(default_factory=Metrics)
    #: Set when the API listener shuts down: live streams end instead of holding the stop.
    closing: bool = False
    #: The Service's metrics registry (``trackrelay.metrics.Metrics``), when a Service runs the
    #: tracker: /metrics answers ``await service_metrics.response()`` and /readyz its ``ready()``.
    service_metrics: Any = None
    #: The relay's rewrite, for the page of a recipient's copy (None: the copy is not made again).
    rewrite: Rewrite | None = None


CTX = web.AppKey("ctx", Context)
