"""What the tracker's handlers share: config, keys, the recorder, metrics (one ``web.AppKey``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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


CTX = web.AppKey("ctx", Context)
