"""A source that stops answering never costs the guest an I/O error: once the
bridge's retry window is over, the failed read pauses the VM (error_policy and
rerror_policy 'stop'), the engine says why and resumes the VM by itself when the
source answers again; a source gone for good leaves the VM paused, and rollback
removes everything."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Engine
from tests.e2e.conftest import sha256, wait_console
from tests.e2e.test_import import _finish
from tests.e2e.test_run import domain
from tests.support import guest
from tests.support.far_source import FarSource
from thinair.adapters import procfs
from thinair.client import Client, EngineUnreachable

pytestmark = pytest.mark.guest

# The guest reads its 64 MiB pattern region right after its boot marker: at
# 40 Mbit/s that takes about 13 s, so a source stopped at the marker fails
# reads the guest is waiting for (uncached: nothing has read them before).
SLOW = "40M"
WINDOW = "2"


def _engine(make_engine: Callable[..., Engine]) -> Engine:
    return make_engine(
        "qemu:///system", THINAIR_RECONNECT_WINDOW=WINDOW, THINAIR_RESUME_CHECK_INTERVAL="1"
    )


def _wait_vm(c: Client, name: str, until: Callable[[Any], bool], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        vm = c.vms.get(name)
        if until(vm):
            return vm
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}: still {vm.state} ({vm.pause_reason}) after {timeout} s")
        time.sleep(0.25)


def _follow(c: Client, seen: list[tuple[str, dict[str, Any]]]) -> threading.Thread:
    def run() -> None:
        with contextlib.suppress(EngineUnreachable):  # the engine stops with the test
            for kind, data in c.events():
                seen.append((kind, data))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _boot_then_cut(c: Client, name: str, source: FarSource) -> None:
    """Start the VM, stop the source when the guest begins reading its pattern."""
    c.vms.create(name, disks=[f"{source.url},storage=tmp"], memory_mib=256)
    assert "error_policy='stop'" in domain(name).XMLDesc(0).replace('"', "'")  # type: ignore[union-attr]
    c.vms.start(name)
    wait_console(c, name, lambda i: i["boot_ok"], timeout=240)
    source.stop()


@pytest.mark.parametrize(
    "outage",
    [8, pytest.param(120, marks=[pytest.mark.slow, pytest.mark.timeout(600)], id="2min")],
)
def test_source_outage_pauses_then_resumes_without_guest_error(
    make_engine: Callable[..., Engine],
    guest_image: Path,
    workdir: Path,
    storage_dir: Path,
    outage: float,
) -> None:
    """The source stays away `outage` seconds (past the window) while the guest
    waits for uncached reads: paused all along, no guest error, resumed by
    itself once the source is back, then imported with every flushed write."""
    engine = _engine(make_engine)
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    final = workdir / "final"
    final.mkdir(mode=0o755)
    c.storage_domains.add("final", str(final))
    source = FarSource(guest_image, workdir / "source.pid", rate=SLOW).start()
    try:
        _boot_then_cut(c, "i15-outage", source)
        vm = _wait_vm(
            c, "i15-outage", lambda v: v.pause_reason and "does not answer" in v.pause_reason, 60
        )
        assert vm.state == "paused" and source.url in vm.pause_reason
        gone = time.monotonic()
        while time.monotonic() - gone < outage:  # well past the window: paused, sees nothing
            assert c.vms.get("i15-outage").state == "paused"
            time.sleep(min(5, outage))
        # Back, at full speed on the same port.
        source = FarSource(guest_image, workdir / "source.pid", port=source.port).start()
        vm = _wait_vm(c, "i15-outage", lambda v: v.state == "running", 30)
        assert vm.pause_reason is None
        # The read that failed was issued again: the guest's own check passes.
        info = wait_console(c, "i15-outage", lambda i: i["pattern_md5"] is not None, timeout=120)
        assert info["pattern_md5"] == guest.expected_pattern_md5()
        wait_console(c, "i15-outage", lambda i: len(i["wrote"]) >= 2)
        assert "I/O error" not in c.vms.console("i15-outage").text
        assert "outages: resumed i15-outage" in engine.log()
        job = c.vms.import_("i15-outage", to="final")
        assert job.wait(timeout=300).state == "succeeded"
        _finish(c, "i15-outage", guest_image)
    finally:
        source.stop()


def test_source_gone_for_good_stays_paused_and_rolls_back(
    make_engine: Callable[..., Engine], guest_image: Path, workdir: Path, storage_dir: Path
) -> None:
    engine = _engine(make_engine)
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    before = sha256(guest_image)
    source = FarSource(guest_image, workdir / "source.pid", rate=SLOW).start()
    seen: list[tuple[str, dict[str, Any]]] = []
    _follow(c, seen)
    try:
        _boot_then_cut(c, "i15-gone", source)
        vm = _wait_vm(
            c, "i15-gone", lambda v: v.pause_reason and "does not answer" in v.pause_reason, 60
        )
        time.sleep(4)
        assert c.vms.get("i15-gone").state == "paused"
        shown = engine.cli("vm", "show", "i15-gone", check=True).stdout
        assert "paused" in shown and "does not answer" in shown and source.url in shown
        paused = [d for k, d in seen if k == "vm" and d.get("state") == "paused" and "reason" in d]
        assert paused and source.url in paused[-1]["reason"], seen
        assert paused[-1]["reason"] == vm.pause_reason
        c.vms.rollback("i15-gone")
        assert domain("i15-gone") is None
        assert list(storage_dir.iterdir()) == []
        assert procfs.find(frozenset({"nbdkit"}), str(engine.home)) == {}
        assert sha256(guest_image) == before
    finally:
        source.stop()
