"""`thinair vm console NAME --attach`: the guest's serial console, live, on a
terminal (virsh console against the VM's host), left with Ctrl+] while the
guest keeps running."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

import pytest

from tests.conftest import Engine
from tests.support import guest
from tests.unit.test_cli import on_terminal
from thinair.adapters import qemu_nbd

pytestmark = pytest.mark.guest


def test_attach_then_leave(
    engine: Engine, guest_export: qemu_nbd.Server, storage_dir: Path
) -> None:
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    c.vms.create("i18-attach", disks=[guest_export.url], memory_mib=256)
    stopped = on_terminal(engine, "vm", "console", "i18-attach", "--attach")
    assert stopped[0] == 1 and "is stopped: start it first" in stopped[1]
    c.vms.start("i18-attach")

    def until_written(leader: int, shown: bytearray) -> None:
        deadline = time.monotonic() + 120
        while guest.MARK_WROTE.encode() not in shown:
            assert time.monotonic() < deadline, shown.decode(errors="replace")[-2000:]
            if select.select([leader], [], [], 0.5)[0]:
                shown += os.read(leader, 65536)
        os.write(leader, b"\x1d")  # Ctrl+]: leave, as virsh console

    status, shown = on_terminal(
        engine, "vm", "console", "i18-attach", "--attach", interact=until_written
    )
    assert "leave with Ctrl+]" in shown and guest.MARK_WROTE in shown
    assert status == 0, shown[-2000:]
    assert c.vms.get("i18-attach").state == "running"  # leaving does not stop it
    c.vms.rollback("i18-attach")


def test_web_terminal(
    engine: Engine, guest_export: qemu_nbd.Server, storage_dir: Path, workdir: Path
) -> None:
    """The console dialog's terminal (xterm.js over the engine's WebSocket) shows
    the guest's output live, and the page keeps working when it is closed."""
    from playwright.sync_api import expect

    from tests.support import browser

    if not (Path(__file__).parents[2] / "thinair/web/static/vendor/xterm/xterm.js").exists():
        pytest.skip("xterm.js not fetched (scripts/setup.sh needs npm)")
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    c.vms.create("i18-term", disks=[guest_export.url], memory_mib=256)
    c.vms.start("i18-term")
    with browser.chromium(workdir / "profile") as context:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"http://127.0.0.1:{engine.port}/ui/")
        page.get_by_label("API token").fill((engine.home / "token").read_text().strip())
        page.get_by_label("API token").press("Enter")
        page.locator("#vm-i18-term").get_by_role("button", name="Console").click()
        page.get_by_role("button", name="Type into it (terminal)").click()
        rows = page.locator("#console-term .xterm-rows")
        expect(rows).to_contain_text("waiting for output")
        expect(rows).to_contain_text(guest.MARK_WROTE, timeout=120_000)
        page.keyboard.type("\n")  # goes to the guest; nothing breaks
        browser.Shots(page, browser.screenshot_dir("web-terminal"))("terminal")
        # Escape is a key for the guest in a terminal: the dialog's button closes it.
        page.locator("#console-dialog").get_by_role("button", name="Close").click()
        expect(page.locator("#console-dialog")).to_be_hidden()
        assert errors == []
    c.vms.rollback("i18-term")
