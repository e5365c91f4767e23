"""Several `trackrelay serve --only ROLE` processes sharing one PostgreSQL, for the scale-out test
and its benchmark: N relays, N workers and N trackers as subprocesses on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from helpers import PASSWORD_HASH, free_port, to_toml

ROOT = Path(__file__).resolve().parent.parent
KEY = "scale-key-0123456789abcdef"


@dataclass
class Proc:
    role: str
    config: Path
    log: Path
    ports: dict
    popen: subprocess.Popen | None = None

    def start(self, cpu: int | None = None) -> "Proc":
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self._log = open(self.log, "ab")
        pre = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
        self.popen = subprocess.Popen([sys.executable, "-m", "trackrelay.cli", "-c", str(self.config), "serve",
                                       "--only", self.role], stdout=self._log, stderr=self._log,
                                      stdin=subprocess.DEVNULL, env=env, preexec_fn=pre)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.popen is None or self.popen.poll() is not None:
            return self.popen.returncode if self.popen else None
        self.popen.send_signal(sig)
        try:
            return self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(10)
        finally:
            self._log.close()


@dataclass
class Topology:
    db_url: str
    upstream_url: str
    tmp: Path
    n: int = 2
    procs: list[Proc] = field(default_factory=list)
    public_port: int = 0

    def _config(self, role: str, i: int, **ports) -> Path:
        cfg = {
            "relay": {"listen": f"127.0.0.1:{ports.get('relay', free_port())}", "hostname": "relay.example.test"},
            "upstream": {"url": self.upstream_url, "starttls": False, "timeout_seconds": 10, "max_connections": 4},
            "queue": {"retry_initial_seconds": 0.5, "retry_max_seconds": 2, "lease_seconds": 6},
            "storage": {"url": self.db_url},
            "tracker": {"listen": f"127.0.0.1:{ports.get('tracker', free_port())}",
                        "public_url": f"http://127.0.0.1:{self.public_port}", "secret_keys": [KEY]},
            "api": {"listen": f"127.0.0.1:{ports.get('api', free_port())}"},
            "tracking": {"scanner_window_seconds": 0},
            "log": {"level": "warning"},
            "users": [{"name": "alice", "password_hash": PASSWORD_HASH, "addresses": ["alice@example.com"]}],
        }
        path = self.tmp / f"{role}{i}.toml"
        path.write_text(to_toml(cfg))
        return path

    def build(self, relays: int | None = None, workers: int | None = None, trackers: int | None = None) -> None:
        self.public_port = free_port()
        counts = {"relay": relays if relays is not None else self.n, "worker": workers if workers is not None else self.n,
                  "tracker": trackers if trackers is not None else self.n}
        for role, count in counts.items():
            for i in range(count):
                ports = {"relay": free_port(), "tracker": free_port(), "api": free_port()}
                self.procs.append(Proc(role, self._config(role, i, **ports), self.tmp / f"{role}{i}.log", ports))

    def of(self, role: str) -> list[Proc]:
        return [p for p in self.procs if p.role == role]

    async def start(self, pin: bool = False) -> None:
        # The first process migrates; the others would wait on the advisory lock anyway.
        for i, p in enumerate(self.procs):
            p.start(cpu=(i % 2) if pin else None)
        deadline = time.monotonic() + 60
        for p in self.procs:
            port = p.ports["relay"] if p.role == "relay" else p.ports["tracker"] if p.role == "tracker" else None
            while port and time.monotonic() < deadline:
                if p.popen.poll() is not None:
                    raise AssertionError(f"{p.role} exited: {p.log.read_text()[-2000:]}")
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                    w.close()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)

    def stop(self) -> None:
        for p in self.procs:
            p.stop()

    def logs_clean(self) -> bool:
        return not any("Traceback" in p.log.read_text() for p in self.procs if p.log.exists())


async def send_many(relay_ports: list[int], n: int, rcpts_per: int, concurrency: int = 8,
                    html: bytes | None = None) -> list[str]:
    """Send n messages round-robin over the relays; returns their Message-IDs."""
    import aiosmtplib
    ids: list[str] = []
    counter = iter(range(n))

    async def worker(k: int):
        port = relay_ports[k % len(relay_ports)]
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, local_hostname="load.test",
                            timeout=60, source_address=("127.0.0.2", 0))
        await c.connect()
        await c.login("alice", "s3cret-pw")
        sent = 0
        for i in counter:
            mid = f"<scale-{i}@example.com>"
            body = html or (b"<html><body><p>Hello</p><a href=\"https://example.com/a\">a</a> "
                            b"<a href=\"https://example.com/b\">b</a></body></html>\r\n")
            msg = (f"From: alice@example.com\r\nTo: x@ext.test\r\nSubject: scale {i}\r\nMessage-ID: {mid}\r\n"
                   f"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n").encode() + body
            await c.sendmail("alice@example.com", [f"r{i}-{j}@ext.test" for j in range(rcpts_per)], msg)
            ids.append(mid)
            sent += 1
            if sent % 200 == 0:  # fresh sessions now and then, as real clients do
                await c.quit()
                c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, local_hostname="load.test",
                                    timeout=60, source_address=("127.0.0.2", 0))
                await c.connect()
                await c.login("alice", "s3cret-pw")
        await c.quit()

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return ids


async def hit_trackers(urls: list[str], tracker_ports: list[int], public_port: int, n: int,
                       concurrency: int = 32) -> float:
    """n GETs of pixel and click URLs spread over the trackers; returns the elapsed seconds."""
    ua = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36"
    it = iter(range(n))
    conn = aiohttp.TCPConnector(limit=concurrency, local_addr=("127.0.0.4", 0))
    async with aiohttp.ClientSession(connector=conn, headers={"User-Agent": ua}) as s:
        async def worker():
            for i in it:
                url = urls[i % len(urls)].replace(f":{public_port}/", f":{tracker_ports[i % len(tracker_ports)]}/")
                async with s.get(url, allow_redirects=False) as r:
                    await r.read()
                    assert r.status in (200, 302), (r.status, url)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0
