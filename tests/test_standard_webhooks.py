"""Webhooks signed by Standard Webhooks, verified by the `standardwebhooks` package (issue 21), with
the deprecated ``X-Trackrelay-Signature`` still sent and still verifying as before."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import datetime, timezone

import pytest
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from relay.webhooks import signed_headers
from test_crm import send
from test_feed_api import Receiver, start, urls
from test_tracker import browser

SECRET = "hook-secret-0123"


def receivers_key(secret: str) -> str:
    """What a receiver gives a Standard Webhooks library: ``whsec_`` + base64 of the secret's bytes."""
    return "whsec_" + base64.b64encode(secret.encode()).decode()


class Recording(Receiver):
    """The feed tests' receiver (which checks the old header) that also keeps every attempt as
    received (the raw body and the headers) and refuses the first delivery of one event type."""

    def __init__(self, secret: str, refuse_first: str):
        super().__init__(secret)
        self.attempts: list[tuple[bytes, dict[str, str]]] = []
        self.refuse_first = refuse_first
        self.refused = False

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts.append((body, dict(request.headers)))
        if not self.refused and json.loads(body)["type"] == self.refuse_first:
            self.refused = True
            return web.Response(status=500)
        return await super().handle(request)


def test_signed_headers_verify_with_the_standard_library():
    body = b'{"id": 7, "type": "opened"}'
    t = int(time.time())
    headers = signed_headers(SECRET, "7", t, body)
    assert headers["webhook-id"] == "7" and headers["webhook-timestamp"] == str(t)
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(receivers_key(SECRET)).verify(body, headers) == {"id": 7, "type": "opened"}
    assert Webhook(SECRET.encode()).verify(body, headers) == {"id": 7, "type": "opened"}
    # The library's own signature is ours, byte for byte.
    assert Webhook(receivers_key(SECRET)).sign("7", datetime.fromtimestamp(t, timezone.utc), body.decode()) \
        == headers["webhook-signature"]
    for tampered in (body + b" ", body.replace(b"7", b"8")):
        with pytest.raises(WebhookVerificationError):
            Webhook(receivers_key(SECRET)).verify(tampered, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(receivers_key(SECRET)).verify(body, dict(headers, **{"webhook-id": "8"}))
    with pytest.raises(WebhookVerificationError):
        Webhook(receivers_key("another-secret-99")).verify(body, headers)


async def test_a_real_delivery_verifies_with_standardwebhooks_and_the_old_header(relay, sink):
    receiver = Recording(SECRET, refuse_first="opened")
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    hooks = [{"url": f"http://127.0.0.1:{port}/hook", "secret": SECRET, "retry_initial_seconds": 0.2}]
    loop = asyncio.get_running_loop()
    try:
        await start(relay, webhooks=hooks)
        await asyncio.sleep(0.5)  # the webhook's cursor starts now
        await send(relay, ["carol@ext.test"])
        (r,) = await sink.wait_for(1)
        deadline = loop.time() + 10
        while {"queued", "sent"} - {e["type"] for e in receiver.events} and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert {"queued", "sent"} <= {e["type"] for e in receiver.events}
        # An open through the tracker, whose first delivery the receiver refuses: it is sent again.
        pixel, _ = urls(r.data)
        async with browser() as b:
            async with b.get(pixel) as px:
                assert px.status == 200
        deadline = loop.time() + 10
        while "opened" not in {e["type"] for e in receiver.events} and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert "opened" in {e["type"] for e in receiver.events}
    finally:
        await runner.cleanup()

    # The old header verified every attempt, as before (the feed tests' receiver checks it).
    assert receiver.bad_signatures == 0
    assert all("X-Trackrelay-Signature" in h for _, h in receiver.attempts)
    wh = Webhook(receivers_key(SECRET))
    ids_by_event: dict[int, set[str]] = {}
    for body, headers in receiver.attempts:
        event = wh.verify(body, headers)
        assert event == json.loads(body)
        assert headers["webhook-id"] == str(event["id"])  # the event's own id: receivers deduplicate on it
        assert headers["webhook-signature"].startswith("v1,")
        assert headers["webhook-timestamp"].isdigit()
        ids_by_event.setdefault(event["id"], set()).add(headers["webhook-id"])
        with pytest.raises(WebhookVerificationError):
            wh.verify(body.replace(b'"type": "', b'"type": "x'), headers)
        with pytest.raises(WebhookVerificationError):
            wh.verify(body + b"\n", headers)
    opened = [(b, h) for b, h in receiver.attempts if json.loads(b)["type"] == "opened"]
    assert len(opened) >= 2  # refused once, then delivered
    assert len({h["webhook-id"] for _, h in opened}) == 1  # the same id on the retry
    assert all(len(ids) == 1 for ids in ids_by_event.values())
