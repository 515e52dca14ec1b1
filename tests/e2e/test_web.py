"""The web UI, end to end in headless Chromium against a live engine and a guest
that boots from a remote NBD export: sign in, create a VM from a URI (checked as
it is typed), run it and watch its console, import it with a progress bar (and
cancel once), roll another VM back, expose an image and copy its URL. Each step
leaves a screenshot in $THINAIR_SCREENSHOTS (default /var/tmp/thinair-screenshots)."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from tests.conftest import Engine
from tests.support import browser, guest
from thinair.adapters import qemu_img, qemu_nbd

pytestmark = [pytest.mark.guest, pytest.mark.browser]


@pytest.fixture
def chromium(workdir: Path) -> Iterator[BrowserContext]:
    with browser.chromium(workdir / "chromium-profile") as context:
        context.grant_permissions(["clipboard-read", "clipboard-write"])
        yield context


def every_control_is_labelled(page: Page) -> list[str]:
    """Form controls on the page that a screen reader could not name."""
    unlabelled: list[str] = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter(el => el.offsetParent !== null)
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                          && !(el.tagName === 'BUTTON' && el.textContent.trim()))
            .map(el => el.outerHTML.slice(0, 120))"""
    )
    return unlabelled


def fits_width(page: Page) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


def new_vm(page: Page, name: str, url: str) -> None:
    page.get_by_role("button", name="New VM").click()
    dialog = page.locator("#vm-dialog")
    expect(dialog).to_be_visible()
    dialog.get_by_label("Name").fill(name)
    dialog.get_by_label("Memory (MiB)").fill("256")
    dialog.get_by_label("External disk URI").fill(url)
    dialog.get_by_label("Format").select_option("raw")


def test_whole_flow_in_a_browser(
    engine: Engine,
    guest_export: qemu_nbd.Server,
    storage_dir: Path,
    workdir: Path,
    chromium: BrowserContext,
) -> None:
    c = engine.client()
    token = (engine.home / "token").read_text().strip()
    page = chromium.new_page()
    shot = browser.Shots(page, browser.screenshot_dir("web-flow"))
    console_errors: list[str] = []
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    server_errors: list[str] = []
    page.on(
        "response",
        lambda r: server_errors.append(f"{r.status} {r.url}") if r.status >= 500 else None,
    )

    # Sign in: a wrong token is refused, the right one shows the engine.
    page.goto(f"http://127.0.0.1:{engine.port}/")
    assert page.url.endswith("/ui/")
    page.get_by_label("API token").fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#sign-in-error")).to_contain_text("does not know this token")
    page.get_by_label("API token").fill(token)
    shot("sign-in")
    page.get_by_label("API token").press("Enter")
    expect(page.locator("#who")).to_contain_text("qemu:///system")
    assert page.evaluate("sessionStorage.getItem('thinair-token')") == token
    page.reload()  # the tab keeps the token
    expect(page.locator("#who")).to_contain_text("qemu:///system")

    # A storage domain, added in the page, shows its size and free space.
    page.get_by_text("Add a storage domain").click()
    page.locator("#sd-form").get_by_label("Name").fill("sd")
    page.locator("#sd-form").get_by_label("Directory").fill(str(storage_dir))
    page.locator("#sd-form").get_by_role("button", name="Add").click()
    sd_row = page.locator("#storage tr", has_text=str(storage_dir))
    expect(sd_row).to_contain_text("GiB")
    assert [d.name for d in c.storage_domains.list()] == ["sd"]

    # New VM: the URI is checked as it is typed.
    new_vm(page, "web-a", "nbd://127.0.0.1:1/nothing")
    probe = page.locator("#disk0-probe")
    expect(probe).to_contain_text("cannot read nbd://127.0.0.1:1/nothing")
    shot("new-vm-bad-uri")
    page.locator("#vm-dialog").get_by_label("External disk URI").fill(guest_export.url)
    expect(probe).to_have_text("Reachable: raw, 256 MiB, read-only export")
    assert every_control_is_labelled(page) == []
    shot("new-vm-uri-checked")
    page.get_by_role("button", name="Create").click()
    card = page.locator("#vm-web-a")
    expect(card).to_contain_text("external")
    expect(page.locator("#vm-dialog")).to_be_hidden()
    assert c.vms.get("web-a").disks[0].external_disk.url == guest_export.url  # type: ignore[union-attr]
    shot("vm-created")

    # Run it: the console opens and follows the guest booting from the remote disk.
    card.get_by_role("button", name="Start").click()
    console = page.locator("#console-text")
    expect(console).to_contain_text(guest.MARK_BOOT_OK, timeout=180_000)
    expect(console).to_contain_text(guest.MARK_WROTE, timeout=60_000)
    expect(page.locator("#console-info")).to_contain_text(re.compile(r"started in \d+\.\d\d s"))
    shot("console")
    page.keyboard.press("Escape")  # closes the dialog, as any dialog here
    expect(page.locator("#console-dialog")).to_be_hidden()
    expect(card).to_contain_text("running")
    expect(page.locator("#vm-web-a-start-time")).to_contain_text("started in")

    # Another VM from the same export, with a blank second disk, rolled back: the
    # dialog says what goes, the blank disk with the temporary one.
    new_vm(page, "web-b", guest_export.url)
    expect(probe).to_contain_text("Reachable")
    page.get_by_role("button", name="Add another disk").click()
    page.locator("#disk1-kind").select_option("blank")
    expect(page.locator("#disk1-url")).to_be_hidden()
    page.locator("#disk1-size").fill("0.0625")  # GiB: 64 MiB
    assert every_control_is_labelled(page) == []
    shot("new-vm-blank-disk")
    page.get_by_role("button", name="Create").click()
    card_b = page.locator("#vm-web-b")
    expect(card_b).to_be_visible()
    expect(card_b.locator(".badge", has_text="local, blank")).to_be_visible()
    boot_b, blank_b = c.vms.get("web-b").disks
    assert (boot_b.location, blank_b.location, blank_b.blank) == ("external", "local", True)
    assert blank_b.virtual_size == 64 * 2**20 and blank_b.external_disk is None
    assert qemu_img.info(blank_b.volume_path).backing_filename is None
    card_b.get_by_role("button", name="Start").click()
    expect(page.locator("#console-title")).to_have_text("Console of web-b")
    page.get_by_role("button", name="Close").click()
    expect(card_b).to_contain_text("running")
    blklist = subprocess.run(
        ["virsh", "-c", "qemu:///system", "domblklist", "web-b"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert blklist[blklist.index("vdb") + 1] == blank_b.volume_path  # QEMU has it
    overlay_b = Path(boot_b.volume_path)
    assert overlay_b.exists()
    card_b.get_by_role("button", name="Roll back").click()
    confirm = page.locator("#confirm-dialog")
    expect(confirm).to_contain_text("Roll back web-b: stop it, undefine its domain and delete:")
    expect(confirm).to_contain_text(str(overlay_b))
    expect(confirm).to_contain_text(f"{blank_b.volume_path} on sd (blank disk made with the VM")
    expect(confirm).to_contain_text(f"Kept, never written: the external disk {guest_export.url}.")
    shot("rollback-confirm")
    confirm.get_by_role("button", name="Keep it").click()  # no: nothing changes
    assert overlay_b.exists() and c.vms.get("web-b")
    card_b.get_by_role("button", name="Roll back").click()
    confirm.get_by_role("button", name="Roll back and delete").click()
    expect(page.locator("#vm-web-b")).to_have_count(0)
    assert not overlay_b.exists() and not Path(blank_b.volume_path).exists()
    assert [v.name for v in c.vms.list()] == ["web-a"]
    assert "web-b" not in [d.name() for d in libvirt.open("qemu:///system").listAllDomains()]

    # Import, slowly, and cancel: the VM stays on its temporary disk.
    def start_import(bandwidth: str) -> None:
        card.get_by_role("button", name="Import").click()
        dialog = page.locator("#import-dialog")
        dialog.get_by_label("Target storage domain").select_option("sd")
        dialog.get_by_label("Strategy").select_option("bulk")
        dialog.get_by_label("Bandwidth limit").fill(bandwidth)
        dialog.get_by_role("button", name="Start import").click()

    start_import("2")
    bar = page.get_by_label("web-a vda import progress")
    expect(bar).to_be_visible()
    card.get_by_role("button", name="Cancel import").click()
    expect(page.locator("#jobs tr", has_text="cancelled")).to_have_count(1)
    expect(card.locator(".badge", has_text="external")).to_be_visible()
    assert c.vms.get("web-a").disks[0].location == "external"

    # Import for real: the bar moves, live, until the disk is local.
    start_import("16")
    seen: set[int] = set()
    while card.locator(".badge", has_text="local").count() == 0:
        if bar.count():
            value = bar.get_attribute("value")
            if value is not None and 0 < int(value) < 100 and int(value) not in seen:
                if not seen:
                    shot("import-progress")
                seen.add(int(value))
        page.wait_for_timeout(300)
    assert len(seen) >= 2, f"the progress bar showed only {seen}"
    expect(page.locator("#jobs tr", has_text="succeeded")).to_have_count(1)
    expect(card.locator(".badge", has_text="running")).to_be_visible()
    disk = c.vms.get("web-a").disks[0]
    assert disk.location == "local" and disk.external_disk is None
    assert card.get_by_role("button", name="Roll back").count() == 0  # nothing to roll back to
    shot("imported")

    # Expose an image and copy its URL.
    image = workdir / "expose-me.qcow2"
    qemu_img.create(str(image), "qcow2", 16 * 2**20)
    page.get_by_text("Expose an image").click()
    form = page.locator("#expose-form")
    form.get_by_label("Image path").fill(str(image))
    form.get_by_role("button", name="Expose").click()
    row = page.locator("#exports tr", has_text=str(image))
    expect(row).to_contain_text("running")
    (export,) = c.exports.list()
    row.get_by_role("button", name="Copy URL").click()
    expect(page.locator("#toast")).to_have_text("URL copied")
    assert page.evaluate("navigator.clipboard.readText()") == export.url
    shot("exported")

    # Keyboard only: the New VM dialog opens, takes focus, and Escape leaves it.
    page.locator("#new-vm").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#vm-dialog")).to_be_visible()
    assert page.evaluate("document.activeElement.name") == "name"
    page.keyboard.press("Escape")
    expect(page.locator("#vm-dialog")).to_be_hidden()

    # 1280x800 and a narrow phone screen: nothing wider than the window.
    assert fits_width(page)
    page.set_viewport_size(browser.NARROW)
    assert fits_width(page)
    shot("narrow")
    new_vm(page, "web-c", guest_export.url)
    assert fits_width(page)
    shot("narrow-new-vm")
    page.keyboard.press("Escape")
    page.set_viewport_size(browser.DESKTOP)

    # Changes made elsewhere (another client, the guest, libvirt) show up live from
    # the engine's event stream, well before the page's 30 s look-again.
    c.vms.create("bl-web-live", disks=["size=1M"])
    expect(page.locator("#vm-bl-web-live")).to_contain_text("local, blank", timeout=10_000)
    c.vms.stop("web-a", force=True)
    expect(card.locator("h3 .badge")).to_have_text("stopped", timeout=10_000)
    c.vms.remove("bl-web-live")
    expect(page.locator("#vm-bl-web-live")).to_have_count(0, timeout=10_000)

    row.get_by_role("button", name="Unexpose").click()
    expect(page.locator("#exports")).to_contain_text("No exports.")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API token")).to_be_focused()
    assert page.evaluate("sessionStorage.getItem('thinair-token')") is None
    assert console_errors == [] and server_errors == []


# A boot sector that writes MESSAGE to COM1 and halts: a real guest whose
# serial console prints markup, booted by SeaBIOS in a second. (cli; cld;
# ds=0; si=message; dx=0x3f8; loop: lodsb; test al,al; jz halt; out dx,al;
# jmp loop; halt: hlt; jmp halt)
BOOT_CODE = bytes.fromhex("fafc31c08ed8be177cbaf803ac84c07403eeebf8f4ebfd")
HOSTILE = (
    "I19-BEGIN <script>window.__pwned = 'script'</script>"
    "<img src=x onerror=\"window.__pwned = 'img'\"><b id=i19-bold>bold</b> I19-END\r\n"
)


def markup_guest(path: Path) -> None:
    sector = BOOT_CODE + HOSTILE.encode() + b"\0"
    assert len(sector) <= 510
    with open(path, "wb") as f:
        f.write(sector.ljust(510, b"\0") + b"\x55\xaa")
        f.truncate(2**20)


def test_markup_stays_text(
    engine: Engine, storage_dir: Path, workdir: Path, chromium: BrowserContext
) -> None:
    """A guest that prints HTML and script on its serial console, and an error
    message carrying markup (the engine echoes a bad URL): the page shows both
    as text (in the audit view too), builds no element from them and runs no
    script. The engine's Content-Security-Policy stops an inline handler even
    if one got in. A plain export beyond loopback shows its warning; a token
    that is not admin sees no audit view, and once revoked is signed out."""
    c = engine.client()
    image = workdir / "markup.raw"
    markup_guest(image)
    c.storage_domains.add("sd", str(storage_dir))
    c.vms.create("i19-markup", [f"{image},format=raw"], memory_mib=32)
    c.vms.start("i19-markup")
    deadline = time.monotonic() + 60
    while "I19-END" not in c.vms.console("i19-markup").text:
        assert time.monotonic() < deadline, c.vms.console("i19-markup").text[-2000:]
        time.sleep(0.25)

    page = chromium.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    csp_reports: list[str] = []
    page.on(
        "console", lambda m: csp_reports.append(m.text) if "Content Security" in m.text else None
    )
    response = page.goto(f"http://127.0.0.1:{engine.port}/ui/")
    assert response is not None
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    page.get_by_label("API token").fill((engine.home / "token").read_text().strip())
    page.get_by_label("API token").press("Enter")
    row = page.locator("article", has_text="i19-markup")
    row.get_by_role("button", name="Console").click()
    pre = page.locator("#console-text")
    expect(pre).to_contain_text("I19-END")
    assert "<script>window.__pwned = 'script'</script>" in pre.inner_text()
    assert pre.evaluate("el => el.children.length") == 0  # text only, no element
    assert page.locator("#i19-bold").count() == 0
    page.keyboard.press("Escape")

    # An error message with markup in it, as the engine echoes a bad URL back.
    new_vm(page, "i19-bad", "nbd://host/<img src=x onerror=\"window.__pwned='err'\">")
    page.locator("#vm-dialog").get_by_role("button", name="Create").click()
    form_error = page.locator("#vm-form-error")
    expect(form_error).to_contain_text("<img src=x onerror=")
    assert form_error.evaluate("el => el.children.length") == 0
    shot = browser.Shots(page, browser.screenshot_dir("web-markup"))
    shot("markup-as-text")
    page.keyboard.press("Escape")

    # A plain export beyond loopback: the page says what it means.
    plain = c.exports.create(str(image), format="raw", listen="0.0.0.0", tls="none")
    # The admin's audit view lists that refusal, its markup as text too.
    page.reload()
    expect(page.locator(f"#export-{plain.name}-warning")).to_contain_text("anyone on the network")
    audit = page.locator("#audit")
    expect(audit).to_contain_text("create_vm")
    expect(audit).to_contain_text("<img src=x onerror=")
    assert audit.locator("img").count() == 0
    shot("audit")

    # Defence in depth: markup that did reach the DOM runs no inline handler.
    page.evaluate(
        """() => { const d = document.createElement('div');
                   d.innerHTML = '<img src=x onerror="window.__pwned = 1">';
                   document.body.append(d); }"""
    )
    page.wait_for_timeout(500)
    assert page.evaluate("window.__pwned") is None
    assert csp_reports, "the browser did not report the blocked inline handler"
    assert errors == []
    # Another (not admin) token sees no audit view; revoked, the page is signed
    # out within seconds (its event stream closes, the engine refuses it again).
    other = c.tokens.create("i19-ui")
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("API token").fill(other.token)
    page.get_by_label("API token").press("Enter")
    expect(page.locator("#vms")).to_contain_text("i19-markup")
    expect(page.locator("#audit-section")).to_be_hidden()
    c.tokens.revoke("i19-ui")
    expect(page.locator("#sign-in-view")).to_be_visible(timeout=10_000)
    c.exports.remove(plain.id)
    c.vms.stop("i19-markup", force=True)
    c.vms.remove("i19-markup")
