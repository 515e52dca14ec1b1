"""The web UI's views an oVirt or Proxmox admin looks for, in headless Chromium
against an engine on libvirt's test driver (no guest boots, so it is quick): no
"Sign out" before signing in, a favicon, a Hosts section, form errors next to
their form, the expose options, an import whose dialog does not default to the
temporary disks' domain and whose card offers no Roll back while it copies, the
job view with its steps, times and chart, and the phone layout. Screenshots go
to $THINAIR_SCREENSHOTS/web-views (default /var/tmp/thinair-screenshots)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from tests.conftest import Engine
from tests.support import browser

pytestmark = [pytest.mark.browser]


@pytest.fixture
def chromium(workdir: Path) -> Iterator[BrowserContext]:
    with browser.chromium(workdir / "chromium-profile") as context:
        yield context


WIDEST = """() => [...document.querySelectorAll('body *')]
    .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
    .slice(-3).map(e => e.outerHTML.slice(0, 100))"""


def fits_width(page: Page) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


def test_views(test_engine: Engine, workdir: Path, chromium: BrowserContext) -> None:
    c = test_engine.client()
    for name in ("i18-tmp", "i18-final"):
        (workdir / name).mkdir(mode=0o755)
        c.storage_domains.add(name, str(workdir / name))
    # 6 MiB of data: at 1 MiB/s the copy lasts long enough to be looked at.
    image = workdir / "i18-src.raw"
    with open(image, "wb") as f:
        f.write(os.urandom(6 * 2**20))
        f.truncate(64 * 2**20)
    c.vms.create("i18-web", disks=[f"{image},storage=i18-tmp"], memory_mib=64)

    page = chromium.new_page()
    shot = browser.Shots(page, browser.screenshot_dir("web-views"))
    missing: list[str] = []
    page.on("response", lambda r: missing.append(r.url) if r.status >= 400 else None)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.goto(f"http://127.0.0.1:{test_engine.port}/ui/")
    expect(page.get_by_label("API token")).to_be_visible()
    expect(page.get_by_role("button", name="Sign out")).to_be_hidden()
    assert page.evaluate("document.querySelector('link[rel=icon]').href").endswith("favicon.svg")
    icon = page.request.get(f"http://127.0.0.1:{test_engine.port}/ui/favicon.svg")
    assert icon.status == 200 and "svg" in icon.headers["content-type"]
    # The hint's command is never broken inside a word.
    cmd = page.locator("#sign-in-view code.cmd")
    style = cmd.evaluate("e => [getComputedStyle(e).overflowWrap, getComputedStyle(e).wordBreak]")
    assert style == ["normal", "normal"], style
    shot("sign-in")
    page.get_by_label("API token").fill((test_engine.home / "token").read_text().strip())
    page.get_by_label("API token").press("Enter")
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()

    card = page.locator("#vm-i18-web")
    expect(card.locator(".badge", has_text="external")).to_be_visible()
    expect(page.locator("#host-local")).to_contain_text("MiB free of")

    # A form's error shows by the form, not in a toast.
    page.get_by_text("Add a storage domain").click()
    sd_form = page.locator("#sd-form")
    sd_form.get_by_label("Name").fill("i18-bad")
    sd_form.get_by_label("Directory").fill(str(workdir / "not-there"))
    sd_form.get_by_role("button", name="Add").click()
    expect(page.locator("#sd-error")).to_contain_text("not an existing directory")
    expect(page.locator("#toast")).to_be_hidden()

    # Expose: a name, TLS, and a running VM's disk as the source.
    page.get_by_text("Expose an image").click()
    expose = page.locator("#expose-form")
    expect(expose.get_by_label("TLS")).to_be_visible()
    expect(expose.get_by_label("Export name")).to_be_visible()
    expose.get_by_label("Source").select_option("vm")
    expect(expose.locator("select[name=vm]")).to_be_visible()
    expect(expose.get_by_label("Image path")).to_be_hidden()
    expose.get_by_label("Source").select_option("image")
    expose.get_by_label("Image path").fill(str(workdir / "nope.raw"))
    expose.get_by_label("TLS").select_option("psk")
    expose.get_by_role("button", name="Expose").click()
    expect(page.locator("#expose-error")).not_to_be_empty()
    shot("form-errors")

    # Import: the target is not where the temporary disk is; while it copies,
    # no Roll back, and the rate says MiB/s and the limit.
    card.get_by_role("button", name="Import").click()
    dialog = page.locator("#import-dialog")
    expect(dialog.get_by_label("Target storage domain")).to_have_value("i18-final")
    dialog.get_by_label("Bandwidth limit").fill("1")
    dialog.get_by_role("button", name="Start import").click()
    expect(card.locator(".badge", has_text="copying")).to_be_visible()
    assert card.get_by_role("button", name="Roll back").count() == 0
    expect(page.locator("#jobs tr").nth(1)).to_contain_text("(limit 1 MiB/s)")
    expect(page.locator("#jobs tr").nth(1)).to_contain_text("i18-final")
    shot("importing")
    expect(page.locator("#jobs tr", has_text="succeeded")).to_have_count(1, timeout=60_000)
    expect(card.locator(".badge", has_text="local")).to_be_visible()

    # The job view: steps with their times, the bytes done over time.
    page.locator("#jobs tr", has_text="succeeded").get_by_role("button", name="Details").click()
    view = page.locator("#job-dialog")
    expect(view).to_be_visible()
    expect(view).to_contain_text("running")
    expect(view.locator("tr", has_text="succeeded")).to_have_count(1)
    expect(view.locator("time").first).to_have_attribute("datetime", re.compile(r"^\d{4}-.*Z$"))
    points = view.locator("#job-chart polyline").get_attribute("points") or ""
    assert len(points.split()) >= 3, points
    shot("job-view")
    page.keyboard.press("Escape")

    # A phone: one header line, nothing wider than the screen, and a console
    # that says it waits for the guest (the test driver's guest prints nothing).
    page.set_viewport_size(browser.NARROW)
    header = page.locator("header").bounding_box()
    shot("phone")
    assert header is not None and header["height"] < 60, header
    assert fits_width(page), page.evaluate(WIDEST)
    card.get_by_role("button", name="Console").click()
    expect(page.locator("#console-text")).to_have_attribute("data-empty", "true")
    shot("phone-console")
    page.keyboard.press("Escape")
    assert errors == []
    assert [u for u in missing if "/api/" not in u] == []  # no 404 for a page file
