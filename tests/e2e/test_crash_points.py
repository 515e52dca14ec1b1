"""The engine SIGKILLed at each step of create, start, import (mirror and
bulk), rollback and expose (engine.faults' crash points): restarted, it
finishes or undoes the flow, and what it owns is consistent again: every VM has
its domain and volumes, every file and process belongs to a VM, a bridge or an
export, and an import in progress completes without being asked again."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Engine
from tests.e2e.conftest import wait_console
from tests.e2e.test_import import _finish
from tests.e2e.test_run import domain
from thinair.adapters import procfs, qemu_nbd
from thinair.adapters.virt import Virt
from thinair.client import Client, EngineUnreachable
from thinair.engine.faults import VARIABLE

pytestmark = pytest.mark.guest


def _crash_then_restart(engine: Engine, action: Callable[[], object]) -> Client:
    """Run `action` until the engine kills itself at its crash point, then start
    the engine again without the crash point."""
    with contextlib.suppress(EngineUnreachable):  # the engine dies under the request
        action()
    assert engine.proc is not None
    engine.proc.wait(timeout=300)
    assert engine.proc.returncode == -9, engine.log()[-2000:]
    del engine.extra_env[VARIABLE]
    engine.start()
    return engine.client()


def _assert_consistent(engine: Engine, c: Client, dirs: list[Path]) -> None:
    vms = c.vms.list()
    assert all(vm.phase == "ready" for vm in vms), vms
    for vm in vms:
        dom = domain(vm.name)
        assert dom is not None, vm.name
        for disk in vm.disks:
            assert Path(disk.volume_path).exists(), disk
            assert disk.volume_path in dom.XMLDesc(0), (vm.name, disk.volume_path)
    volumes = {d.volume_path for vm in vms for d in vm.disks}
    files = {str(p) for d in dirs for p in d.iterdir()}
    assert files == volumes, f"files that belong to no VM: {files - volumes}"
    home = str(engine.home)
    bridged = sum(
        1 for vm in vms for d in vm.disks if d.external_disk and "nbd" in d.external_disk.url
    )
    assert len(procfs.find(frozenset({"nbdkit"}), home)) == bridged
    exports = c.exports.list()
    assert len(procfs.find(frozenset({"qemu-nbd"}), home)) == len(exports)
    export_dirs = engine.home / "exports"
    on_disk = {p.name for p in export_dirs.iterdir()} if export_dirs.exists() else set()
    assert on_disk == {e.id for e in exports}
    engine_id = (engine.home / "engine-id").read_text().strip()
    virt = Virt("qemu:///system")
    try:
        owned = virt.owned_domains(engine_id)
    finally:
        virt.close()
    assert set(owned.values()) == {vm.name for vm in vms}, f"orphan domains: {owned}"


@pytest.fixture
def crashing(make_engine: Callable[..., Engine]) -> Callable[[str], Engine]:
    return lambda point: make_engine("qemu:///system", **{VARIABLE: point})


@pytest.mark.parametrize("point", ["create-overlays", "create-defined"])
def test_killed_while_creating(
    crashing: Callable[[str], Engine],
    guest_export: qemu_nbd.Server,
    storage_dir: Path,
    point: str,
) -> None:
    engine = crashing(point)
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    c = _crash_then_restart(
        engine, lambda: c.vms.create("cp-create", disks=[guest_export.url], memory_mib=128)
    )
    assert c.vms.list() == []  # undone
    assert domain("cp-create") is None
    _assert_consistent(engine, c, [storage_dir])


def test_killed_while_starting(
    crashing: Callable[[str], Engine], guest_export: qemu_nbd.Server, storage_dir: Path
) -> None:
    engine = crashing("start-bridges")
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    c.vms.create("cp-start", disks=[guest_export.url], memory_mib=128)
    c = _crash_then_restart(engine, lambda: c.vms.start("cp-start"))
    assert c.vms.get("cp-start").state == "stopped"
    _assert_consistent(engine, c, [storage_dir])
    assert c.vms.start("cp-start").state == "running"
    _assert_consistent(engine, c, [storage_dir])
    c.vms.rollback("cp-start")


def test_killed_while_rolling_back(
    crashing: Callable[[str], Engine], guest_export: qemu_nbd.Server, storage_dir: Path
) -> None:
    engine = crashing("destroy-undefined")
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    c.vms.create("cp-rb", disks=[guest_export.url], memory_mib=128)
    c.vms.start("cp-rb")
    c = _crash_then_restart(engine, lambda: c.vms.rollback("cp-rb"))
    assert c.vms.list() == []  # finished
    assert domain("cp-rb") is None
    _assert_consistent(engine, c, [storage_dir])


@pytest.mark.parametrize(
    ("point", "strategy"),
    [("import-pivoted", "mirror"), ("import-switching", "bulk"), ("import-checkpoint", "bulk")],
)
def test_killed_while_importing(
    crashing: Callable[[str], Engine],
    guest_export: qemu_nbd.Server,
    guest_image: Path,
    workdir: Path,
    point: str,
    strategy: str,
) -> None:
    engine = crashing(point)
    c = engine.client()
    tmp, final = workdir / "tmp", workdir / "final"
    for path in (tmp, final):
        path.mkdir(mode=0o755)
        c.storage_domains.add(path.name, str(path))
    c.vms.create("cp-imp", disks=[f"{guest_export.url},storage=tmp"], memory_mib=256)
    c.vms.start("cp-imp")
    wait_console(c, "cp-imp", lambda i: i["boot_ok"] and len(i["wrote"]) >= 1)
    job = c.vms.import_("cp-imp", to="final", strategy=strategy)
    c = _crash_then_restart(engine, lambda: c.jobs.wait(job.id, timeout=300))
    done = c.jobs.wait(job.id, timeout=300)  # resumed by the engine itself
    assert done.state == "succeeded", done.error
    vm = c.vms.get("cp-imp")
    assert vm.state == "running" and vm.disks[0].location == "local"
    _assert_consistent(engine, c, [tmp, final])
    _finish(c, "cp-imp", guest_image)


def test_killed_while_exposing_an_image(
    crashing: Callable[[str], Engine], guest_image: Path, storage_dir: Path
) -> None:
    engine = crashing("expose-started")
    c = engine.client()
    c = _crash_then_restart(engine, lambda: c.exports.create(str(guest_image)))
    assert c.exports.list() == []  # undone: its server stopped, its directory gone
    _assert_consistent(engine, c, [storage_dir])


def test_killed_while_exposing_a_vms_disk(
    crashing: Callable[[str], Engine], guest_export: qemu_nbd.Server, storage_dir: Path
) -> None:
    engine = crashing("expose-frozen")
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    vm = c.vms.create("cp-exp", disks=[guest_export.url], memory_mib=128)
    c.vms.start("cp-exp")
    c = _crash_then_restart(engine, lambda: c.exports.create(vm="cp-exp", disk="vda"))
    assert c.exports.list() == []
    # The snapshot taken for the export is merged back: the VM writes to its
    # temporary disk again, and nothing else is left in the storage domain.
    dom = domain("cp-exp")
    assert dom is not None and dom.isActive()
    assert vm.disks[0].volume_path in dom.XMLDesc(0)
    assert ".exposed-" not in dom.XMLDesc(0)
    _assert_consistent(engine, c, [storage_dir])
    c.vms.rollback("cp-exp")
