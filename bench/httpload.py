"""A lean HTTP/1.1 load generator: keep-alive GETs on raw asyncio connections.

aiohttp's client spends ~50 µs of CPU per request on this machine; on its one core it tops out near
19,000 requests/s, less than a bare aiohttp server answers on the other core, so the client, not the
server, set the bare server's figure. This client writes a prepared request and reads the response
(status line, headers, a Content-Length body) with a few bytes operations, at several times that
rate, so both servers are measured at their own limit.

Each connection sends its next request when the last response is complete (no pipelining), as a
browser or an image proxy does. Requests carry the headers aiohttp's client sends.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit


class _Connection(asyncio.Protocol):
    def __init__(self, requests: list[bytes], next_index, latencies: list[float], done: asyncio.Future,
                 interval: float = 0.0, stop=None):
        self.requests, self.next_index, self.latencies, self.done = requests, next_index, latencies, done
        self.buf = b""
        self.started = 0.0
        self.transport: asyncio.Transport | None = None
        self.interval, self.stop = interval, stop
        self.due = 0.0  # paced: when the next request is due (perf_counter)

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._send()

    def _paced(self) -> None:
        """The next request at its due time (or now, if late): a fixed rate per connection."""
        now = time.perf_counter()
        self.due = max(self.due + self.interval, now) if self.due else now
        if self.due > now:
            asyncio.get_running_loop().call_later(self.due - now, self._send)
        else:
            self._send()

    def _send(self) -> None:
        i = None if self.stop is not None and self.stop() else next(self.next_index, None)
        if i is None:
            self.transport.close()
            if not self.done.done():
                self.done.set_result(None)
            return
        self.started = time.perf_counter()
        self.transport.write(self.requests[i % len(self.requests)])

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.buf = buf
            return
        head = buf[:end]
        status = head[9:12]
        if status not in (b"200", b"302"):
            self._fail(RuntimeError(f"HTTP {status.decode()}: {head[:200]!r}"))
            return
        at = head.lower().find(b"\r\ncontent-length:")
        length = 0
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17:stop if stop > 0 else len(head)])
        if len(buf) < end + 4 + length:
            self.buf = buf
            return
        self.buf = buf[end + 4 + length:]
        self.latencies.append(time.perf_counter() - self.started)
        self._paced() if self.interval else self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self._fail(exc or RuntimeError("connection closed by the server"))

    def _fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
        self.transport.close()


def prepared(url: str, user_agent: str) -> tuple[str, int, bytes]:
    """(host, port, the request's bytes) for a GET of ``url``."""
    u = urlsplit(url)
    path = u.path + (f"?{u.query}" if u.query else "")
    request = (f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nAccept: */*\r\n"
               f"Accept-Encoding: gzip, deflate\r\nUser-Agent: {user_agent}\r\n\r\n").encode()
    return u.hostname, u.port, request


async def load(urls: list[str], n: int, concurrency: int, user_agent: str, rate: float = 0.0,
               stop=None) -> tuple[float, list[float]]:
    """GET ``n`` requests over ``concurrency`` keep-alive connections, cycling through ``urls`` (all
    of one host): (seconds elapsed, each request's latency in seconds). ``rate`` > 0 paces them to
    that many requests per second in all (each connection its share; as fast as answered if the
    server falls behind); ``stop()`` returning true ends the load before ``n``."""
    interval = concurrency / rate if rate else 0.0
    loop = asyncio.get_running_loop()
    parts = [prepared(u, user_agent) for u in urls]
    host, port = parts[0][0], parts[0][1]
    requests = [p[2] for p in parts]
    latencies: list[float] = []
    indices = iter(range(n))
    dones = [loop.create_future() for _ in range(concurrency)]
    t0 = time.perf_counter()
    for done in dones:
        await loop.create_connection(lambda d=done: _Connection(requests, indices, latencies, d, interval, stop),
                                     host, port)
    await asyncio.gather(*dones)
    return time.perf_counter() - t0, latencies
