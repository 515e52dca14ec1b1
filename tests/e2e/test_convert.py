"""Foreign guests converted with virt-v2v in place (`vm create --convert`), and
`quick-import --ova`.

The conversion tests are `slow` (libguestfs's appliance runs under TCG here,
minutes each) and install what they need through scripts/build-v2v-guest.sh:
virt-v2v, guestfs-tools, debootstrap and a kernel in /boot for the appliance.
The converted guest is a debootstrap'ed Debian 12 whose fstab says /dev/sda1
and whose initramfs has no virtio drivers: it boots on thinair's virtio disk only
once virt-v2v has converted it.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Engine
from tests.e2e.conftest import sha256, wait_console
from tests.e2e.test_import import _check_final_disk
from tests.support import foreign, guest
from thinair.adapters import procfs, qemu_nbd
from thinair.engine.faults import VARIABLE

pytestmark = pytest.mark.guest

ROOT = Path(__file__).resolve().parents[2]
MARKER = "THINAIR-V2V-BOOTED"


@pytest.fixture(scope="session")
def v2v_guest() -> Path:
    """The foreign Debian guest (built once, cached under /var/cache/thinair), and
    virt-v2v installed."""
    done = subprocess.run(
        [str(ROOT / "scripts" / "build-v2v-guest.sh")],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        timeout=3600,
    )
    return Path(done.stdout.strip().splitlines()[-1])


def _console_until(engine: Engine, name: str, text: str, timeout: float) -> str:
    c = engine.client()
    deadline = time.monotonic() + timeout
    while True:
        console = c.vms.console(name).text
        if text in console or time.monotonic() > deadline:
            return console
        time.sleep(1)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_convert_then_boot(
    engine: Engine,
    v2v_guest: Path,
    storage_dir: Path,
    nbd_export: Callable[..., qemu_nbd.Server],
) -> None:
    """`vm create --convert` over NBD: virt-v2v writes only the overlay, the VM
    then boots from its virtio disk (fstab now names /dev/vda1), and rollback
    leaves nothing; the source image is unchanged."""
    before = sha256(v2v_guest)
    export = nbd_export(v2v_guest, fmt="raw")
    c = engine.client()
    c.storage_domains.add("sd", str(storage_dir))
    name = "v2v-debian"
    began = time.monotonic()
    done = engine.cli(
        "vm", "create", name, "--disk", export.url, "--memory", "512", "--convert", "--json",
        check=True, timeout=3000,
    )  # fmt: skip
    took = time.monotonic() - began
    print(f"vm create --convert took {took:.0f} s")
    steps = [json.loads(line)["step"] for line in done.stdout.splitlines() if '"kind"' in line]
    assert any("Converting" in (s or "") for s in steps), steps
    vm = c.vms.get(name)
    assert vm.phase == "ready" and vm.state == "stopped"
    log = engine.home / "v2v" / f"{name}.log"
    assert "Converting" in log.read_text()
    c.vms.start(name)
    console = _console_until(engine, name, MARKER, timeout=600)
    assert f"{MARKER} fstab-root=/dev/vda1 present=yes" in console, console[-3000:]
    c.vms.rollback(name)
    assert list(storage_dir.iterdir()) == []
    assert not log.exists()
    assert sha256(v2v_guest) == before


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_convert_fails_undoes_create(
    engine: Engine,
    v2v_guest: Path,
    guest_image: Path,
    storage_dir: Path,
    nbd_export: Callable[..., qemu_nbd.Server],
) -> None:
    """virt-v2v cannot convert the busybox test guest (no OS it knows): the job
    fails with virt-v2v's own words and the log's path, the create is undone,
    and the log is kept."""
    c = engine.client()
    c.storage_domains.add("sd", str(storage_dir))
    name = "v2v-not-an-os"
    url = nbd_export(guest_image, fmt="raw").url
    done = engine.cli("vm", "create", name, "--disk", url, "--convert", timeout=1500)
    assert done.returncode == 1
    log = engine.home / "v2v" / f"{name}.log"
    said = "".join(done.stderr.split())  # the CLI wraps long lines
    assert "inspectioncouldnotdetectthesourceguest" in said, done.stderr
    assert str(log) in said, done.stderr
    assert log.exists() and "virt-v2v-in-place" in log.read_text()
    assert [v.name for v in c.vms.list()] == []
    assert list(storage_dir.iterdir()) == []
    (job,) = c.jobs.list()
    assert job.kind == "convert" and job.state == "failed"


def test_quick_import_ova(engine: Engine, guest_image: Path, workdir: Path) -> None:
    """`quick-import --ova PATH --to SD`: name, memory and disks from the OVF, the
    VM runs on the VMDK inside the tar and is imported; the local disk holds the
    guest's records and the source's data."""
    sd = workdir / "final"
    sd.mkdir(mode=0o755)
    c = engine.client()
    c.storage_domains.add("final", str(sd))
    ova = foreign.guest_ova(guest_image, name="v2v-appliance")
    ova_sum = sha256(ova)
    engine.cli("quick-import", "--ova", str(ova), "--to", "final", "--json", check=True)
    vm = c.vms.get("v2v-appliance")
    assert (vm.memory_mib, vm.cpus) == (256, 1)
    info = wait_console(c, vm.name, lambda i: i["boot_ok"] and len(i["wrote"]) >= 2)
    assert info["pattern_md5"] == guest.expected_pattern_md5()
    c.vms.stop(vm.name, force=True)
    _check_final_disk(c, vm.name, guest_image)
    assert list((engine.home / "bridges").glob("*.sock")) == []
    c.vms.remove(vm.name)
    assert list(sd.iterdir()) == []
    assert sha256(ova) == ova_sum


def test_quick_import_bad_input(engine: Engine) -> None:
    both = engine.cli("quick-import", "nbd://h/x", "--ova", "/srv/a.ova", "--to", "x")
    assert both.returncode == 1 and "either disk URLs or --ova" in both.stderr
    nameless = engine.cli("quick-import", "nbd://h/x", "--to", "x")
    assert nameless.returncode == 1 and "--name is required" in nameless.stderr


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_killed_while_converting(
    make_engine: Callable[..., Engine],
    v2v_guest: Path,
    storage_dir: Path,
    nbd_export: Callable[..., qemu_nbd.Server],
) -> None:
    """The engine SIGKILLed while virt-v2v converts: restarted, it stops the
    virt-v2v it left, converts again on fresh overlays, and the VM boots."""
    engine = make_engine("qemu:///system", **{VARIABLE: "convert-running"})
    export = nbd_export(v2v_guest, fmt="raw")
    c = engine.client()
    c.storage_domains.add("sd", str(storage_dir))
    name = "v2v-crash"
    c.vms.create(name, disks=[export.url], memory_mib=512, convert=True)
    assert engine.proc is not None
    engine.proc.wait(timeout=1800)
    assert engine.proc.returncode == -9, engine.log()[-2000:]
    v2v_procs = frozenset({"virt-v2v-in-place"})
    left = procfs.find(v2v_procs, str(engine.home))
    print(f"virt-v2v left running by the killed engine: {sorted(left)}")
    del engine.extra_env[VARIABLE]
    engine.start()
    c = engine.client()
    job = c.vms.get(name).conversion()
    assert job is not None
    final = job.wait(timeout=2400)
    assert final.state == "succeeded", final.error
    assert not set(left) & set(procfs.find(v2v_procs, str(engine.home)))
    assert c.vms.get(name).phase == "ready"
    c.vms.start(name)
    console = _console_until(engine, name, MARKER, timeout=900)
    assert f"{MARKER} fstab-root=/dev/vda1 present=yes" in console, console[-3000:]
    c.vms.rollback(name)
    assert list(storage_dir.iterdir()) == []
    assert sorted(p.name for p in (engine.home / "v2v").iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_rollback_while_converting(
    engine: Engine,
    v2v_guest: Path,
    storage_dir: Path,
    nbd_export: Callable[..., qemu_nbd.Server],
) -> None:
    """A converting VM cannot start; rolled back, its conversion is stopped
    (virt-v2v and its appliance with it) and nothing is left but the log."""
    export = nbd_export(v2v_guest, fmt="raw")
    c = engine.client()
    c.storage_domains.add("sd", str(storage_dir))
    name = "v2v-rollback"
    vm = c.vms.create(name, disks=[export.url], memory_mib=512, convert=True)
    assert vm.phase == "converting" and vm.state == "converting"
    job = vm.conversion()
    assert job is not None
    while "Inspecting" not in (job.step or ""):  # the appliance is up
        assert job.state == "running", job
        job = c.jobs.get(job.id)
        time.sleep(1)
    started = engine.cli("vm", "start", name)
    assert started.returncode == 1 and "converting" in started.stderr
    c.vms.rollback(name)
    assert c.jobs.get(job.id).state == "cancelled"
    assert c.vms.list() == []
    assert list(storage_dir.iterdir()) == []
    assert procfs.find(frozenset({"virt-v2v-in-place"}), str(engine.home)) == {}
    assert [p.name for p in (engine.home / "v2v").iterdir()] == [f"{name}.log"]
