"""Metrics and readiness (issue 19): /metrics in every role, parsed with prometheus_client's own
parser; the counters move as mail is sent and delivered; /readyz says 503 while the database (or a
worker's upstream) is unreachable and 200 again after; /healthz is liveness only."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import _pg_dsn, pg_test_url
from helpers import base_config, client, free_port, make_config, simple_message, to_toml

ROOT = Path(__file__).resolve().parent.parent
HTML_MSG = (b"From: Alice <alice@example.com>\r\nTo: carol@ext.test\r\nSubject: Offer\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            b"<html><body><p>Hi, see <a href=\"https://example.com/offer\">the offer</a>.</p></body></html>\r\n")


async def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of http://127.0.0.1:port/metrics as {(name, sorted labels): value}."""
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def eventually(check, timeout: float, what: str) -> None:
    """Await ``check()`` until it is true (every 0.1 s), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def status_of(port: int, path: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=10)) as r:
            return r.status, await r.json()


# -- one process: every role ----------------------------------------------------------------------

async def test_metrics_of_one_process_move_as_mail_is_sent_and_delivered(relay, sink):
    port = free_port()
    await relay.start(metrics={"listen": f"127.0.0.1:{port}"})
    before = await scrape(port)
    assert value(before, "trackrelay_messages_accepted_total") == 0
    build = _build_labels(before)
    assert build["roles"] == "relay,worker,tracker" and build["version"] and build["python"]
    assert value(before, "trackrelay_build_info", **build) == 1
    assert value(before, "trackrelay_database_up") == 1

    c = await client(relay.port)
    await c.sendmail("alice@example.com", ["carol@ext.test"], HTML_MSG)
    await c.quit()
    got = await sink.wait_for(1)
    await relay.wait_status({"sent"}, 1)
    with pytest.raises(Exception):  # a wrong password: one AUTH failure
        await client(relay.port, password="wrong-password")

    async def delivered():
        s = await scrape(port)
        return value(s, "trackrelay_delivery_attempts_total", outcome="sent") == 1 and s
    await eventually(delivered, 10, what="the attempt counted")
    m = await scrape(port)
    assert value(m, "trackrelay_messages_accepted_total") == 1
    assert value(m, "trackrelay_smtp_data_replies_total", code="250") == 1
    # aiosmtplib tries each mechanism the relay offers: one failure (and one 535) for each.
    failures = value(m, "trackrelay_auth_failures_total")
    assert failures >= 1 and value(m, "trackrelay_smtp_replies_total", code="535") == failures
    assert value(m, "trackrelay_auth_lockouts_total") == 0
    assert value(m, "trackrelay_delivery_attempt_seconds_count", outcome="sent") == 1
    assert value(m, "trackrelay_delivery_delay_seconds_count") == 1
    assert value(m, "trackrelay_delivery_delay_seconds_bucket", le="+Inf") == 1
    assert value(m, "trackrelay_spool_writer_items_total") == 1
    # Queue depth is a cached query (5 s): at the latest after that it shows the copy sent.
    relay.service.metrics._db.at = 0
    m = await scrape(port)
    assert value(m, "trackrelay_queue_depth", status="sent") == 1
    assert value(m, "trackrelay_crm_jobs", state="pending") + value(m, "trackrelay_crm_jobs", state="done") >= 0

    # The tracker's hits: a pixel, a click and a rejected click are three requests, none counted twice.
    data = got[0].data
    pixel = re.search(rb'src="(http://[^"]+/o/[^"]+\.gif)"', data).group(1).decode()
    click = re.search(rb'href="(http://[^"]+/c/[^"]+)"', data).group(1).decode()
    async with aiohttp.ClientSession() as s:
        for url in (pixel, click, click[:-3] + "xyz"):
            async with s.get(url, allow_redirects=False) as r:
                assert r.status in (200, 302, 404)
    await relay.events_written()
    m = await scrape(port)
    assert value(m, "trackrelay_tracker_requests_total", route="pixel") == 1
    assert value(m, "trackrelay_tracker_requests_total", route="click") == 1
    assert value(m, "trackrelay_tracker_requests_total", route="click_rejected") == 1
    assert value(m, "trackrelay_events_written_total") >= 2
    assert value(m, "trackrelay_event_buffer_depth") == 0
    # The API listener's /metrics is the same registry.
    api_port = int(relay.config.api.listen.rpartition(":")[2])
    a = await scrape(api_port)
    assert value(a, "trackrelay_messages_accepted_total") == 1
    assert value(a, "trackrelay_tracker_requests_total", route="pixel") == 1

    assert await status_of(port, "/readyz") == (200, {"status": "ready"})
    assert await status_of(port, "/healthz") == (200, {"status": "ok"})
    assert await status_of(api_port, "/readyz") == (200, {"status": "ready"})  # the API listener's too


async def test_tracker_hits_are_counted_by_type_and_classification(relay, sink):
    """trackrelay_tracker_hits: the recorder's Stats.classified, carried from the event writer
    process, one series per (type, classification) of the events written."""
    port = free_port()
    await relay.start(metrics={"listen": f"127.0.0.1:{port}"})
    c = await client(relay.port)
    await c.sendmail("alice@example.com", ["carol@ext.test"], HTML_MSG)
    await c.quit()
    (got,) = await sink.wait_for(1)
    pixel = re.search(rb'src="(http://[^"]+/o/[^"]+\.gif)"', got.data).group(1).decode()
    click = re.search(rb'href="(http://[^"]+/c/[^"]+)"', got.data).group(1).decode()
    async with aiohttp.ClientSession() as s:  # aiohttp's agent: a scanner's, machine
        for url in (pixel, pixel, click):
            async with s.get(url, allow_redirects=False) as r:
                assert r.status in (200, 302)
    await relay.events_written()

    async def counted():
        m = await scrape(port)
        return value(m, "trackrelay_tracker_hits_total", type="clicked", classification="machine") == 1 and m
    await eventually(counted, 10, what="the hits counted")
    m = await scrape(port)
    assert value(m, "trackrelay_tracker_hits_total", type="opened", classification="machine") == 2
    assert value(m, "trackrelay_tracker_hits_total", type="opened", classification="human") == 0


async def test_two_services_in_one_process_keep_their_own_registries(tmp_path, sink):
    from trackrelay.service import Service
    services, ports = [], []
    try:
        for i in range(2):
            ports.append(free_port())
            cfg = base_config(db_url=f"sqlite+aiosqlite:///{tmp_path}/db{i}.db", relay_port=free_port(),
                              upstream_url=sink.url, tmp=tmp_path, metrics={"listen": f"127.0.0.1:{ports[-1]}"})
            services.append(Service(make_config(cfg)))
            await services[-1].start()
        c = await client(int(services[0].config.relay.listen.rpartition(":")[2]))
        await c.sendmail("alice@example.com", ["carol@ext.test"], simple_message())
        await c.quit()
        assert value(await scrape(ports[0]), "trackrelay_messages_accepted_total") == 1
        assert value(await scrape(ports[1]), "trackrelay_messages_accepted_total") == 0
    finally:
        for s in services:
            await s.stop()


async def test_worker_readyz_is_503_while_the_upstream_is_unreachable(tmp_path):
    from trackrelay.service import Service
    port, dead = free_port(), free_port()  # nothing listens on `dead`
    cfg = base_config(db_url=f"sqlite+aiosqlite:///{tmp_path}/t.db", relay_port=free_port(),
                      upstream_url=f"smtp://127.0.0.1:{dead}", tmp=tmp_path, metrics={"listen": f"127.0.0.1:{port}"})
    service = Service(make_config(cfg))
    await service.start()
    try:
        status, body = await status_of(port, "/readyz")
        assert status == 503 and set(body["unreachable"]) == {"upstream"}
        assert str(dead) in body["unreachable"]["upstream"]
        assert (await status_of(port, "/healthz"))[0] == 200
    finally:
        await service.stop()


def test_check_config_validates_the_metrics_section(tmp_path):
    from core import config as config_mod
    base = base_config(db_url="sqlite+aiosqlite:///x.db", relay_port=2525, upstream_url="maildir://./o", tmp=tmp_path)
    for bad, words in (({"listen": "nonsense"}, "metrics.listen"), ({"listen": "127.0.0.1:2525"}, "already"),
                       ({"port": 9100}, "metrics.port")):
        with pytest.raises(config_mod.ConfigError) as e:
            make_config(dict(base, metrics=bad))
        assert words in str(e.value), str(e.value)
    assert make_config(dict(base, metrics={"listen": "127.0.0.1:9100"})).metrics.listen == "127.0.0.1:9100"
    assert make_config(base).metrics.listen == ""  # off by default


# -- several processes: serve --only ROLE --metrics-listen ------------------------------------------



class Role:
    def __init__(self, role: str, config: Path, log: Path):
        self.role, self.config, self.log = role, config, log
        self.port = free_port()
        self.popen: subprocess.Popen | None = None

    def start(self) -> "Role":
        self._log = open(self.log, "ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "trackrelay.cli", "-c", str(self.config), "serve", "--only", self.role,
             "--metrics-listen", f"127.0.0.1:{self.port}"], stdout=self._log, stderr=self._log,
            stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        return self

    async def up(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.role} exited: {self.log.read_text()[-2000:]}")
            try:
                await status_of(self.port, "/healthz")
                return
            except (OSError, aiohttp.ClientError):
                await asyncio.sleep(0.1)
        raise AssertionError(f"{self.role}'s metrics listener never answered")

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
            self._log.close()


async def _set_connections(db: str, allowed: bool) -> None:
    """ALLOW_CONNECTIONS on the test database (ours only), and its sessions ended when refused."""
    import asyncpg
    base = _pg_dsn(pg_test_url()).rpartition("/")[0]
    conn = await asyncpg.connect(base + "/postgres")
    try:
        await conn.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS {"true" if allowed else "false"}')
        if not allowed:
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE datname = $1 AND pid <> pg_backend_pid()", db)
    finally:
        await conn.close()


@pytest.mark.postgres
@pytest.mark.slow
async def test_each_only_role_serves_its_metrics_and_readyz_follows_the_database(tmp_path, sink, pg_url):
    relay_port = free_port()
    cfg = base_config(db_url=pg_url, relay_port=relay_port, upstream_url=sink.url, tmp=tmp_path,
                      tracking={"scanner_window_seconds": 0})
    path = tmp_path / "trackrelay.toml"
    path.write_text(to_toml(cfg))
    roles = {r: Role(r, path, tmp_path / f"{r}.log") for r in ("relay", "worker", "tracker")}
    db = pg_url.rpartition("/")[2]
    try:
        for r in roles.values():
            r.start()
        for r in roles.values():
            await r.up()
        m = {name: await scrape(r.port) for name, r in roles.items()}
        assert value(m["relay"], "trackrelay_messages_accepted_total") == 0
        assert ("trackrelay_delivery_attempts_total", (("outcome", "sent"),)) in m["worker"]
        assert ("trackrelay_messages_accepted_total", ()) not in m["worker"]  # each role its own figures
        assert ("trackrelay_tracker_requests_total", (("route", "pixel"),)) in m["tracker"]
        for name in roles:
            assert value(m[name], "trackrelay_build_info", **_build_labels(m[name])) == 1

        c = await client(relay_port)
        for _ in range(3):
            await c.sendmail("alice@example.com", ["carol@ext.test"], HTML_MSG)
        await c.quit()
        got = await sink.wait_for(3, timeout=30)

        async def worker_counted():
            return value(await scrape(roles["worker"].port), "trackrelay_delivery_attempts_total",
                         outcome="sent") == 3
        await eventually(worker_counted, 20, what="the worker's three attempts counted")
        m = {name: await scrape(r.port) for name, r in roles.items()}
        assert value(m["relay"], "trackrelay_messages_accepted_total") == 3
        assert value(m["relay"], "trackrelay_smtp_data_replies_total", code="250") == 3
        assert value(m["worker"], "trackrelay_delivery_delay_seconds_count") == 3
        pixel = re.search(rb'src="(http://[^"]+/o/[^"]+\.gif)"', got[0].data).group(1).decode()
        async with aiohttp.ClientSession() as s:
            async with s.get(pixel) as r:
                assert r.status == 200

        async def tracker_counted():
            t = await scrape(roles["tracker"].port)
            return (value(t, "trackrelay_tracker_requests_total", route="pixel") == 1
                    and value(t, "trackrelay_events_written_total") >= 1)
        await eventually(tracker_counted, 20, what="the tracker's hit counted and written")

        async def depth_sent():  # a query cached for 5 s, the same in every role
            return value(await scrape(roles["worker"].port), "trackrelay_queue_depth", status="sent") == 3
        await eventually(depth_sent, 15, what="queue depth of 3 sent")

        for r in roles.values():
            assert await status_of(r.port, "/readyz") == (200, {"status": "ready"})
        await _set_connections(db, False)
        try:
            for r in roles.values():
                async def unready(r=r):
                    status, body = await status_of(r.port, "/readyz")
                    return status == 503 and "database" in body["unreachable"]
                await eventually(unready, 15, what=f"{r.role}'s /readyz 503")
                assert (await status_of(r.port, "/healthz"))[0] == 200  # still alive
                assert value(await scrape(r.port), "trackrelay_database_up") in (0, 1)  # a scrape still answers
        finally:
            await _set_connections(db, True)
        for r in roles.values():
            async def ready(r=r):
                return (await status_of(r.port, "/readyz"))[0] == 200
            await eventually(ready, 20, what=f"{r.role}'s /readyz 200 again")
    finally:
        await _set_connections(db, True)
        for r in roles.values():
            r.stop()
    for r in roles.values():
        assert "Traceback" not in r.log.read_text(), r.log.read_text()[-3000:]


def _build_labels(samples: dict) -> dict:
    for (name, labels) in samples:
        if name == "trackrelay_build_info":
            return dict(labels)
    raise AssertionError("no trackrelay_build_info")


async def test_webhook_backlog_and_crm_jobs_are_read_from_the_database(relay, sink):
    port, dead = free_port(), free_port()  # nothing listens on `dead`: the events wait
    hook = f"http://127.0.0.1:{dead}/hook?token=not-for-metrics"
    await relay.start(metrics={"listen": f"127.0.0.1:{port}"},
                      webhooks=[{"url": hook, "secret": "s" * 32, "retry_initial_seconds": 60.0}])
    c = await client(relay.port)
    await c.sendmail("alice@example.com", ["carol@ext.test"], simple_message())
    await c.quit()
    await sink.wait_for(1)
    await relay.wait_status({"sent"}, 1)
    label = f"http://127.0.0.1:{dead}/hook"  # no query: it may carry a secret

    async def backlog():
        relay.service.metrics._db.at = 0  # past the 5 s cache
        return value(await scrape(port), "trackrelay_webhook_backlog", webhook=label) >= 1
    await eventually(backlog, 15, what="the webhook's backlog")
    m = await scrape(port)
    assert not any("not-for-metrics" in str(k) for k in m)
    assert value(m, "trackrelay_webhook_given_up_total", webhook=label) == 0
    assert sum(v for (name, _), v in m.items() if name == "trackrelay_crm_jobs") >= 1


async def test_auth_lockouts_and_refusals_are_counted(tmp_path, sink):
    from trackrelay.service import Service
    port, relay_port = free_port(), free_port()
    cfg = base_config(db_url=f"sqlite+aiosqlite:///{tmp_path}/t.db", relay_port=relay_port, upstream_url=sink.url,
                      tmp=tmp_path, metrics={"listen": f"127.0.0.1:{port}"})
    cfg["relay"]["auth_max_failures"] = 2
    service = Service(make_config(cfg))
    await service.start()
    try:
        for _ in range(3):
            with pytest.raises(Exception):
                await client(relay_port, password="wrong-password")
        m = await scrape(port)
        assert value(m, "trackrelay_auth_lockouts_total") >= 1
        assert value(m, "trackrelay_auth_refused_locked_total") >= 1  # 454 without a check
        assert value(m, "trackrelay_smtp_replies_total", code="454") >= 1
    finally:
        await service.stop()
