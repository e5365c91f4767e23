"""Headless Chromium for the tests: Debian's /usr/bin/chromium driven by Python playwright."""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest

CHROMIUM = os.environ.get("TRACKRELAY_TEST_CHROMIUM", "/usr/bin/chromium")
READER_UA = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
             "Chrome/120.0 Safari/537.36")


def require_chromium() -> None:
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        pytest.skip("Python playwright is not installed (pip install '.[test]')")


@contextlib.asynccontextmanager
async def chromium_page(user_agent: str = READER_UA):
    """A fresh page; ``user_agent`` stands in for a reader's browser (HeadlessChrome is a scanner)."""
    require_chromium()
    from playwright.async_api import async_playwright
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            context = await browser.new_context(user_agent=user_agent)
            page = await context.new_page()
            yield page
        finally:
            await browser.close()
