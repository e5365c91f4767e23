"""The public listener's responses at the level of HTTP/1.x bytes on a raw socket.

The pixel and the redirect are written as prepared bytes (tracker_http/prepared.py) rather than by
aiohttp's response machinery; these tests hold them to what aiohttp would have sent: framing,
keep-alive and close, HTTP/1.0, HEAD, and the headers SPEC §6 asks for.
"""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from test_tracker import GIF, events, public, send_tracked, start
from tracker_http.public import NO_STORE

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # HTTP framing, not storage

UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"


class Conn:
    """One TCP connection to the public listener, reading responses exactly by their framing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, relay) -> "Conn":
        host, port = relay.config.tracker.listen.rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port)))

    async def request(self, method: str, path: str, version: str = "1.1", extra: str = "") -> None:
        self.writer.write(f"{method} {path} HTTP/{version}\r\nHost: t.example\r\nUser-Agent: {UA}\r\n"
                          f"{extra}\r\n".encode())
        await self.writer.drain()

    async def response(self, body: bool = True) -> tuple[str, list[tuple[str, str]], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        status, *lines = head[:-4].decode("ascii").split("\r\n")
        fields = [tuple(x.strip() for x in line.split(":", 1)) for line in lines]
        length = int(dict((k.lower(), v) for k, v in fields).get("content-length", "0"))
        data = await asyncio.wait_for(self.reader.readexactly(length), 5) if body else b""
        return status, fields, data

    async def closed_by_server(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 5) == b""

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def tracked_paths(relay, link: int = 0) -> tuple[str, str]:
    """Start the relay, send a tracked message: its pixel's and a link's path on the listener."""
    await start(relay)
    t = await send_tracked(relay)
    base = public(relay)
    return t.pixel("carol@ext.test").split(base, 1)[1], t.clicks("carol@ext.test")[link].split(base, 1)[1]


def names(fields) -> dict[str, str]:
    out = {}
    for k, v in fields:
        assert k.lower() not in out, f"{k} twice"
        out[k.lower()] = v
    return out


async def test_pixel_response_bytes_are_a_complete_http_1_1_response_with_the_spec_headers(relay, sink):
    path, _ = await tracked_paths(relay)
    c = await Conn.open(relay)
    await c.request("GET", path)
    status, fields, body = await c.response()
    h = names(fields)
    assert status == "HTTP/1.1 200 OK" and body == GIF
    assert {k: h[k] for k in ("content-type", "content-length", "cache-control", "pragma", "expires",
                              "referrer-policy")} == {
        "content-type": "image/gif", "content-length": "43", "cache-control": NO_STORE, "pragma": "no-cache",
        "expires": "0", "referrer-policy": "no-referrer"}
    assert abs(email.utils.parsedate_to_datetime(h["date"]).timestamp() - time.time()) < 5
    assert "connection" not in h and "transfer-encoding" not in h
    await c.close()


async def test_keep_alive_connection_carries_pixels_heads_and_redirects_in_turn(relay, sink):
    pixel, click = await tracked_paths(relay)
    c = await Conn.open(relay)
    for method, path in [("GET", pixel), ("HEAD", pixel), ("GET", click), ("HEAD", click), ("GET", pixel)]:
        await c.request(method, path)
        status, fields, body = await c.response(body=method != "HEAD")
        h = names(fields)
        if path == pixel:
            assert (status, h["content-length"]) == ("HTTP/1.1 200 OK", "43")
            assert body == (GIF if method == "GET" else b"")
        else:
            assert (status, h["location"], h["content-length"]) == (
                "HTTP/1.1 302 Found", "https://example.com/offer?a=1&b=2", "0")
            assert h["cache-control"] == NO_STORE and h["referrer-policy"] == "no-referrer"
    # a HEAD's response carries no body: had it, the next status line would not have parsed
    await c.request("GET", "/healthz")
    status, _, body = await c.response()
    assert status == "HTTP/1.1 200 OK" and b"ok" in body
    await c.close()


async def test_pipelined_requests_get_their_responses_in_order(relay, sink):
    pixel, click = await tracked_paths(relay, link=1)
    c = await Conn.open(relay)
    raw = b"".join(f"GET {p} HTTP/1.1\r\nHost: t.example\r\nUser-Agent: {UA}\r\n\r\n".encode()
                   for p in (pixel, click, pixel))
    c.writer.write(raw)
    got = [(await c.response())[0] for _ in range(3)]
    assert got == ["HTTP/1.1 200 OK", "HTTP/1.1 302 Found", "HTTP/1.1 200 OK"]
    await c.close()


async def test_connection_close_request_is_answered_with_close_and_the_socket_closed(relay, sink):
    path, _ = await tracked_paths(relay)
    c = await Conn.open(relay)
    await c.request("GET", path, extra="Connection: close\r\n")
    status, fields, body = await c.response()
    assert status == "HTTP/1.1 200 OK" and body == GIF and names(fields)["connection"] == "close"
    assert await c.closed_by_server()
    await c.close()


async def test_http_1_0_is_answered_in_1_0_and_kept_open_only_when_asked(relay, sink):
    _, click = await tracked_paths(relay)
    c = await Conn.open(relay)
    await c.request("GET", click, version="1.0", extra="Connection: keep-alive\r\n")
    status, fields, _ = await c.response()
    assert status == "HTTP/1.0 302 Found" and names(fields)["connection"] == "keep-alive"
    await c.request("GET", click, version="1.0")
    status, fields, _ = await c.response()
    assert status == "HTTP/1.0 302 Found" and "connection" not in names(fields)
    assert await c.closed_by_server()
    await c.close()


async def test_every_response_on_the_public_listener_is_recorded_once_per_request(relay, sink):
    """The prepared responses still feed the recorder: 3 GETs and a HEAD of the pixel, 4 events."""
    path, _ = await tracked_paths(relay)
    c = await Conn.open(relay)
    for method in ("GET", "HEAD", "GET", "GET"):
        await c.request(method, path)
        await c.response(body=method != "HEAD")
    await c.close()
    rows = await events(relay, want=4)
    assert len(rows) == 4 and sum(r[3] == "head_request" for r in rows) == 1


async def test_a_client_that_pipelines_and_never_reads_gets_a_bounded_write_buffer(relay, sink):
    """Responses go out through aiohttp's stream writer, which waits while the socket's buffer is
    over its high-water mark: the server stops taking that connection's requests instead of
    buffering responses without limit (SO_RCVBUF is kept small on the client's side)."""
    import socket
    import threading
    await start(relay)
    tracker = relay.service.tracker
    host, port = relay.config.tracker.listen.rsplit(":", 1)
    n = 60_000  # ~17 MB of responses: far beyond the kernel's buffers (tcp_wmem's 4 MB by default)
    request = f"GET /o/x.gif HTTP/1.1\r\nHost: t.example\r\nUser-Agent: {UA}\r\n\r\n".encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))

    def pipeline():
        try:
            sock.sendall(request * n)
        except OSError:
            pass  # the socket shut down at the test's end

    writer = threading.Thread(target=pipeline, daemon=True)
    writer.start()
    served = lambda: tracker.ctx.metrics.requests["pixel"]  # noqa: E731
    last, still = -1, 0
    for _ in range(300):  # until the server has stopped taking requests for a second
        await asyncio.sleep(0.1)
        still = still + 1 if served() == last else 0
        last = served()
        if still >= 10:
            break
    buffered = max(h.transport.get_write_buffer_size() for r in tracker._runners if r.server
                   for h in r.server.connections if h.transport is not None)
    sock.shutdown(socket.SHUT_RDWR)  # unblocks the sending thread, and the server sees the end
    writer.join(5)
    sock.close()
    assert still >= 10 and served() < n, (served(), still)
    assert buffered <= 64 * 1024 + 1024, buffered


async def test_other_methods_get_405_with_allow_and_unknown_paths_404_on_the_same_connection(relay, sink):
    pixel, click = await tracked_paths(relay)
    c = await Conn.open(relay)
    for method, path in [("POST", pixel), ("PUT", click), ("DELETE", "/healthz")]:
        await c.request(method, path, extra="Content-Length: 0\r\n")
        status, fields, _ = await c.response()
        assert status == "HTTP/1.1 405 Method Not Allowed", (method, path)
        assert names(fields)["allow"].replace(" ", "") in ("GET,HEAD", "HEAD,GET")
    for path in ("/nothing", "/o/", "/c/x", "/api/v1/events"):
        await c.request("GET", path)
        assert (await c.response())[0] == "HTTP/1.1 404 Not Found", path
    await c.request("GET", pixel)  # the connection still serves
    assert (await c.response())[0] == "HTTP/1.1 200 OK"
    await c.close()
    rows = await events(relay)
    await asyncio.sleep(0.3)  # a refused method's event, had one been recorded, would be written by now
    assert [r[0] for r in await events(relay)] == ["opened"] == [r[0] for r in rows]


async def test_expect_100_continue_is_answered_and_an_unknown_expectation_refused(relay, sink):
    pixel, _ = await tracked_paths(relay)
    c = await Conn.open(relay)
    await c.request("GET", pixel, extra="Expect: 100-continue\r\n")
    interim = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"  # the interim answer, then the response
    status, _, body = await c.response()
    assert status == "HTTP/1.1 200 OK" and body == GIF
    await c.request("GET", pixel, extra="Expect: something-else\r\n")
    assert (await c.response())[0] == "HTTP/1.1 417 Expectation Failed"
    await c.close()
