"""QEMU killed mid-import: the job fails with a clear reason, nothing flushed is
lost, and the import run again (after a restart) resumes and completes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.conftest import Engine
from tests.e2e.conftest import wait_console
from tests.e2e.test_import import _check_final_disk, _wait_step
from tests.support import guest
from thinair.adapters import procfs, qemu_nbd

pytestmark = pytest.mark.guest


@pytest.mark.parametrize("strategy", ["stream", "mirror"])
def test_qemu_killed_mid_import(
    engine: Engine, guest_export: qemu_nbd.Server, guest_image: Path, workdir: Path, strategy: str
) -> None:
    tmp, final = workdir / "tmp", workdir / "final"
    for path in (tmp, final):
        path.mkdir(mode=0o755)
        engine.client().storage_domains.add(path.name, str(path))
    c = engine.client()
    home = "final" if strategy == "stream" else "tmp"
    c.vms.create("qk", disks=[f"{guest_export.url},storage={home}"], memory_mib=256)
    c.vms.start("qk")
    first = wait_console(c, "qk", lambda i: i["boot_ok"] and len(i["wrote"]) >= 2)["wrote"]
    job = c.vms.import_("qk", to="final", strategy=strategy, bandwidth_mib=4)
    _wait_step(c, job.id, "pull" if strategy == "stream" else "copy")
    (pid,) = procfs.find(frozenset({"qemu-system-x86_64"}), "guest=qk,")
    os.kill(pid, signal.SIGKILL)
    failed = c.jobs.wait(job.id, timeout=120)
    assert failed.state == "failed" and "stopped" in (failed.error or ""), failed
    vm = c.vms.get("qk")
    assert vm.state == "stopped" and vm.disks[0].location == "external"
    if strategy == "mirror":
        assert list(final.iterdir()) == []  # the partial copy is gone
    # Start again on the temporary disk: what the guest flushed is there.
    c.vms.start("qk")
    info = wait_console(c, "qk", lambda i: i["boot_ok"] and len(i["wrote"]) >= 1)
    assert min(info["wrote"]) > max(first)
    assert c.vms.import_("qk", to="final", strategy=strategy).wait().state == "succeeded"
    before = len(guest.parse_console(c.vms.console("qk").text)["wrote"])
    wait_console(c, "qk", lambda i: len(i["wrote"]) >= before + 2)
    c.vms.stop("qk", force=True)
    _check_final_disk(c, "qk", guest_image)
    c.vms.remove("qk")
