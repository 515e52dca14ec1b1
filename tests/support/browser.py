"""Headless Chromium (Debian's package) driven by Playwright, for the web UI's tests,
and where their screenshots go so a person can look at them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import BrowserContext, Page, ViewportSize, sync_playwright

CHROMIUM = "/usr/bin/chromium"
# Playwright adds --headless; the rest keep Chromium off the network and quiet.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
NARROW: ViewportSize = {"width": 390, "height": 844}


def screenshot_dir(name: str) -> Path:
    """${THINAIR_SCREENSHOTS:-/var/tmp/thinair-screenshots}/NAME, made fresh."""
    base = Path(os.environ.get("THINAIR_SCREENSHOTS") or "/var/tmp/thinair-screenshots")
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.png"):
        old.unlink()
    return path


@contextmanager
def chromium(profile: Path) -> Iterator[BrowserContext]:
    """A fresh Chromium with its own profile directory, at 1280x800."""
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=ARGS, viewport=DESKTOP
        )
        try:
            context.set_default_timeout(60_000)
            yield context
        finally:
            context.close()


class Shots:
    """Numbered full-page screenshots: 01-sign-in.png, 02-..."""

    def __init__(self, page: Page, where: Path) -> None:
        self.page, self.where, self.n = page, where, 0

    def __call__(self, name: str) -> Path:
        self.n += 1
        path = self.where / f"{self.n:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path
