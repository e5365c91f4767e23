"""Headless Chromium for the tests: Debian's /usr/bin/chromium driven by Python playwright, and
axe-core (from the npm registry) for the accessibility checks."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("TRACKRELAY_TEST_CHROMIUM", "/usr/bin/chromium")
READER_UA = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
             "Chrome/120.0 Safari/537.36")
AXE_PREFIX = Path(os.environ.get("TRACKRELAY_TEST_AXE_PREFIX", Path.home() / ".cache" / "trackrelay-test"))
AXE_VERSION = "4"


def require_chromium() -> None:
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        pytest.skip("Python playwright is not installed (pip install '.[test]')")


def axe_source() -> str:
    """axe.min.js: from TRACKRELAY_TEST_AXE, else installed once with npm under AXE_PREFIX; the
    test skips (with the reason) when neither works."""
    given = os.environ.get("TRACKRELAY_TEST_AXE")
    path = Path(given) if given else AXE_PREFIX / "node_modules" / "axe-core" / "axe.min.js"
    if not path.is_file() and not given:
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("axe-core not found and npm is not installed (apt-get install npm)")
        AXE_PREFIX.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run([npm, "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(AXE_PREFIX),
                            f"axe-core@{AXE_VERSION}"], check=True, capture_output=True, timeout=180)
        except (subprocess.SubprocessError, OSError) as e:
            pytest.skip(f"could not install axe-core with npm: {e}")
    if not path.is_file():
        pytest.skip(f"axe-core not found at {path}")
    return path.read_text(encoding="utf-8")


async def axe_violations(page, source: str) -> list[dict]:
    """WCAG 2 A/AA violations of the page as axe-core reports them (id, impact, help, targets)."""
    await page.add_script_tag(content=source)
    result = await page.evaluate("""async () => {
        const r = await axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']}});
        return {passes: r.passes.length, violations: r.violations.map(v => ({id: v.id, impact: v.impact,
                help: v.help, targets: v.nodes.map(n => n.target.join(' ')).slice(0, 5)}))};
    }""")
    assert result["passes"] > 0, "axe-core checked nothing"
    return result["violations"]


@contextlib.asynccontextmanager
async def chromium_browser():
    require_chromium()
    from playwright.async_api import async_playwright
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            yield browser
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def chromium_page(user_agent: str = READER_UA, **context_options):
    """A fresh page; ``user_agent`` stands in for a reader's browser (HeadlessChrome is a scanner);
    ``context_options`` go to playwright's new_context (timezone_id, java_script_enabled, …)."""
    async with chromium_browser() as browser:
        context = await browser.new_context(user_agent=user_agent, **context_options)
        page = await context.new_page()
        yield page
