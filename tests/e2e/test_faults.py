"""QEMU killed mid-import: the job fails with a clear reason, nothing flushed is
lost, and the import run again (after a restart) resumes and completes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from tests.conftest import Engine
from tests.e2e.conftest import wait_console
from tests.e2e.test_import import _finish, _wait_step
from tests.e2e.test_run import domain
from tests.support import guest
from thinair.adapters import procfs, qemu_nbd
from thinair.client import Client, Job

pytestmark = pytest.mark.guest


def _copying(
    c: Client, name: str, url: str, strategy: str, bandwidth_mib: float
) -> tuple[Job, list[int]]:
    """A booted guest writing its records on "tmp", its import to "final"
    copying: the job and the records written before the copy."""
    c.vms.create(name, disks=[f"{url},storage=tmp"], memory_mib=256)
    c.vms.start(name)
    first = wait_console(c, name, lambda i: i["boot_ok"] and len(i["wrote"]) >= 2)["wrote"]
    job = c.vms.import_(name, to="final", strategy=strategy, bandwidth_mib=bandwidth_mib)
    _wait_step(c, job.id, "copy")
    return job, first


@pytest.mark.parametrize("strategy", ["bulk", "mirror"])
def test_qemu_killed_mid_import(
    engine: Engine,
    guest_export: qemu_nbd.Server,
    guest_image: Path,
    domains: tuple[Path, Path],
    strategy: str,
) -> None:
    tmp, final = domains
    c = engine.client()
    job, first = _copying(c, "qk", guest_export.url, strategy, bandwidth_mib=4)
    (pid,) = procfs.find(frozenset({"qemu-system-x86_64"}), "guest=qk,")
    os.kill(pid, signal.SIGKILL)
    ended = c.jobs.wait(job.id, timeout=180)
    if strategy == "mirror":
        # QEMU was the copier: the job says the VM stopped, and the partial copy goes.
        assert ended.state == "failed" and "stopped" in (ended.error or ""), ended
        vm = c.vms.get("qk")
        assert vm.state == "stopped" and vm.disks[0].location == "external"
        assert list(final.iterdir()) == []
        c.vms.start("qk")
        info = wait_console(c, "qk", lambda i: i["boot_ok"] and len(i["wrote"]) >= 1)
        assert min(info["wrote"]) > max(first)
        assert c.vms.import_("qk", to="final", strategy=strategy).wait().state == "succeeded"
    else:
        # The bulk copy does not need QEMU: it goes on, and the guest's writes
        # are merged into it with qemu-img, the VM being stopped.
        assert ended.state == "succeeded", ended.error
        vm = c.vms.get("qk")
        assert vm.state == "stopped" and vm.disks[0].location == "local"
        assert list(tmp.iterdir()) == []
        c.vms.start("qk")
        info = wait_console(c, "qk", lambda i: i["boot_ok"] and len(i["wrote"]) >= 1)
        assert min(info["wrote"]) > max(first)
    _finish(c, "qk", guest_image)


def test_source_gone_for_good_then_back(
    make_engine: Callable[..., Engine], guest_image: Path, storage_dir: Path
) -> None:
    """The source dies past the reconnect window: the import fails saying so, the
    VM goes on running on what it has, and the import run again once the source
    is back completes with every write."""
    # No bridge cache: with it, the copier reads what the guest's boot fetched
    # (nearly all of the test guest's data) from the cache, and the copy could
    # end without the source.
    engine = make_engine("qemu:///system", THINAIR_RECONNECT_WINDOW="3", THINAIR_BRIDGE_CACHE="off")
    server = qemu_nbd.Server(str(guest_image), export_name="disk")
    server.start()
    try:
        c = engine.client()
        c.storage_domains.add("final", str(storage_dir))
        c.vms.create("gone", disks=[server.url], memory_mib=256)
        c.vms.start("gone")
        wait_console(c, "gone", lambda i: i["boot_ok"] and len(i["wrote"]) >= 1)
        job = c.vms.import_("gone", to="final", bandwidth_mib=4)
        _wait_step(c, job.id, "copy")
        server.stop()
        failed = c.jobs.wait(job.id, timeout=180)
        assert failed.state == "failed", failed
        assert "gone" in (failed.error or "") and "refused" in (failed.error or ""), failed.error
        vm = c.vms.get("gone")
        assert vm.state == "running" and vm.disks[0].location == "external"
        before = len(guest.parse_console(c.vms.console("gone").text)["wrote"])
        wait_console(c, "gone", lambda i: len(i["wrote"]) >= before + 2)  # still writing

        server = qemu_nbd.Server(str(guest_image), export_name="disk", port=server.port)
        server.start()
        done = c.vms.import_("gone", to="final").wait(timeout=300)
        assert done.state == "succeeded", done.error
        _finish(c, "gone", guest_image)
    finally:
        server.stop()


@pytest.fixture
def small_domain(workdir: Path) -> Iterator[Path]:
    """A 400 MiB ext4 file system of its own, so a test can fill it."""
    image, mountpoint = workdir / "small.img", workdir / "small"
    with open(image, "wb") as f:
        f.truncate(400 * 2**20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mountpoint.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
    try:
        os.chmod(mountpoint, 0o755)
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _fill(path: Path, leave: int = 2 * 2**20) -> Path:
    filler = path / "filler"
    size = shutil.disk_usage(path).free - leave
    subprocess.run(["fallocate", "-l", str(size), str(filler)], check=True)
    return filler


@pytest.mark.parametrize("strategy", ["bulk", "mirror"])
def test_storage_domain_full_mid_copy(
    engine: Engine,
    guest_export: qemu_nbd.Server,
    guest_image: Path,
    workdir: Path,
    small_domain: Path,
    strategy: str,
) -> None:
    """The target fills up mid-copy: the job fails saying so, the partial copy is
    deleted, the VM keeps running on its temporary disk, and once space is freed
    the import run again completes with every write."""
    tmp = workdir / "tmp"
    tmp.mkdir(mode=0o755)
    c = engine.client()
    c.storage_domains.add("tmp", str(tmp))
    c.storage_domains.add("small", str(small_domain))
    c.vms.create("full", disks=[f"{guest_export.url},storage=tmp"], memory_mib=256)
    c.vms.start("full")
    wait_console(c, "full", lambda i: i["boot_ok"] and len(i["wrote"]) >= 1)
    job = c.vms.import_("full", to="small", strategy=strategy, bandwidth_mib=4)
    _wait_step(c, job.id, "copy")
    filler = _fill(small_domain)
    failed = c.jobs.wait(job.id, timeout=180)
    assert failed.state == "failed", failed
    assert "is full" in (failed.error or "") and "partial copy is deleted" in (
        failed.error or ""
    ), failed.error
    vm = c.vms.get("full")
    assert vm.state == "running" and vm.disks[0].location == "external"
    assert sorted(p.name for p in small_domain.iterdir()) == ["filler", "lost+found"]
    before = len(guest.parse_console(c.vms.console("full").text)["wrote"])
    wait_console(c, "full", lambda i: len(i["wrote"]) >= before + 2)  # still writing

    filler.unlink()
    assert c.vms.import_("full", to="small").wait(timeout=300).state == "succeeded"
    _finish(c, "full", guest_image)


def _restart_libvirtd() -> None:
    """Stop the system libvirtd and start it again, as an upgrade would. QEMU
    processes outlive it; there is no systemd here, so by hand."""
    pid = int(Path("/run/libvirtd.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "libvirtd did not stop"
        time.sleep(0.1)
    time.sleep(3)  # down for a while: the engine's calls fail meanwhile
    subprocess.run(["libvirtd", "-d"], check=True)
    for _ in range(100):
        if (
            subprocess.run(
                ["virsh", "-c", "qemu:///system", "version"], capture_output=True
            ).returncode
            == 0
        ):
            return
        time.sleep(0.2)
    raise AssertionError("libvirtd did not come back")


@pytest.mark.parametrize("strategy", ["bulk", "mirror"])
def test_libvirtd_restart_mid_import(
    engine: Engine,
    guest_export: qemu_nbd.Server,
    guest_image: Path,
    domains: tuple[Path, Path],
    strategy: str,
) -> None:
    """libvirtd restarts while a disk is copied: the job carries on and completes."""
    c = engine.client()
    job, _first = _copying(c, "lr", guest_export.url, strategy, bandwidth_mib=8)
    _restart_libvirtd()
    assert c.jobs.get(job.id).state == "running"
    done = c.jobs.wait(job.id, timeout=300)
    assert done.state == "succeeded", done.error
    _finish(c, "lr", guest_image)


def test_storage_domain_full_with_the_temporary_disk_on_it(
    engine: Engine, guest_export: qemu_nbd.Server, guest_image: Path, small_domain: Path
) -> None:
    """The temporary disk is on the target domain already, so the copy fills the
    domain the guest writes to: the job fails saying so and deletes its partial
    copy, the guest keeps running (or pauses on the full disk, QEMU's ENOSPC
    policy, rather than seeing errors), and once space is freed `vm start`
    resumes it and the import run again completes with every write."""
    c = engine.client()
    c.storage_domains.add("small", str(small_domain))
    c.vms.create("fullp", disks=[f"{guest_export.url},storage=small"], memory_mib=256)
    c.vms.start("fullp")
    wait_console(c, "fullp", lambda i: i["boot_ok"] and len(i["wrote"]) >= 1)
    job = c.vms.import_("fullp", to="small", bandwidth_mib=4)
    _wait_step(c, job.id, "copy")
    filler = _fill(small_domain, leave=0)
    failed = c.jobs.wait(job.id, timeout=180)
    assert failed.state == "failed", failed
    assert "is full" in (failed.error or "") and "partial copy is deleted" in (
        failed.error or ""
    ), failed.error
    # Had a guest write needed a new cluster, QEMU would have paused it (its
    # ENOSPC policy); `vm start` resumes a paused VM once there is space.
    assert c.vms.get("fullp").state in ("running", "paused")
    dom = domain("fullp")
    assert dom is not None
    if dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
        dom.suspend()
    filler.unlink()
    assert c.vms.start("fullp").state == "running"
    before = len(guest.parse_console(c.vms.console("fullp").text)["wrote"])
    wait_console(c, "fullp", lambda i: len(i["wrote"]) >= before + 2)
    assert c.vms.import_("fullp", to="small").wait(timeout=300).state == "succeeded"
    _finish(c, "fullp", guest_image)
