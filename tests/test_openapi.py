"""The OpenAPI document describes every endpoint, and schemathesis finds no server errors."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from helpers import API_TOKENS, RelayProcess, base_config, client, free_port, to_toml
from test_tracker import HTML_MSG


async def test_openapi_document_lists_every_api_route(relay, sink):
    await relay.start()
    app_routes = set()
    from tracker_http.routes import create_api_app
    app = create_api_app(relay.service.tracker.ctx)
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if path and path.startswith("/api/v1/") and route.method != "HEAD" and "{tail" not in path:
            app_routes.add((path, route.method.lower()))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{relay.config.api.listen}/api/v1/openapi.json") as r:
            doc = await r.json()
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert app_routes - {("/api/v1/openapi.json", "get")} == documented
    assert doc["openapi"].startswith("3.")


@pytest.mark.slow
async def test_schemathesis_finds_no_server_errors(tmp_path, sink):
    st = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    if not Path(st).exists():
        pytest.skip("schemathesis is not installed (pip install '.[test]')")
    port = free_port()
    cfg = base_config(db_url=f"sqlite+aiosqlite:///{tmp_path}/t.db", relay_port=port, upstream_url=sink.url,
                      tmp=tmp_path)
    path = tmp_path / "t.toml"
    path.write_text(to_toml(cfg))
    proc = RelayProcess(path, port, tmp_path / "relay.log").start()
    try:
        await proc.wait_listening()
        c = await client(port)
        await c.sendmail("alice@example.com", ["carol@ext.test", "dave@ext.test"], HTML_MSG)
        await c.quit()
        await sink.wait_for(2)
        await asyncio.sleep(1.0)
        api = cfg["api"]["listen"]
        result = await asyncio.to_thread(subprocess.run, [
            st, "run", f"http://{api}/api/v1/openapi.json", "--checks", "not_a_server_error",
            "--header", f"Authorization: Bearer {API_TOKENS['bob']}", "--max-examples", "25",
            "--exclude-path", "/api/v1/events/stream", "--phases", "examples,coverage,fuzzing",
            "--workers", "1", "--request-timeout", "10", "--seed", "1"],
            capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        assert "Traceback" not in (tmp_path / "relay.log").read_text()
    finally:
        proc.kill(signal.SIGTERM)
