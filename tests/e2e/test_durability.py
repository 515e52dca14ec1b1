"""The moment right after each step of an import, with a VM that never writes.

An idle guest never flushes, so whatever QEMU keeps in its metadata cache stays
there: a QEMU killed then shows what is really on disk. Here the VM runs on a
source with no boot sector (SeaBIOS reads it and waits: nothing writes), QEMU or
the engine is SIGKILLed right after a step of the import reports done (the
engine's crash points) or 3 s after the whole import succeeded, and the disk that
remains, once QEMU has closed it, must hold every byte of the source, for every
strategy the API offers."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Engine
from tests.e2e.test_crash_points import _crash_then_restart
from thinair.adapters import procfs, qemu_img, qemu_nbd
from thinair.client import Client, EngineUnreachable, ThinairAPIError
from thinair.engine.faults import QEMU_PROGRAMS, QEMU_VARIABLE, VARIABLE

pytestmark = pytest.mark.libvirt

MiB = 2**20


def _source(path: Path) -> Path:
    """256 MiB: 96 MiB of random data in 12 extents, holes between them."""
    with open(path, "wb") as f:
        f.truncate(256 * MiB)
        for i in range(12):
            f.seek(i * 20 * MiB + MiB)
            f.write(os.urandom(8 * MiB))
    return path


def _domains(c: Client, workdir: Path) -> tuple[Path, Path]:
    """Storage domains tmp (the temporary disks) and final (the import's target)."""
    paths = workdir / "tmp", workdir / "final"
    for path in paths:
        path.mkdir(mode=0o755)
        c.storage_domains.add(path.name, str(path))
    return paths


def _kill_qemu(name: str) -> None:
    for pid in procfs.find(QEMU_PROGRAMS, f"guest={name},"):
        os.kill(pid, signal.SIGKILL)
        while os.path.exists(f"/proc/{pid}"):
            time.sleep(0.01)


CASES = [
    *[("bulk", "qemu", p) for p in ("copied", "verified", "switching", "pivoted", "committed")],
    *[("bulk", "engine", p) for p in ("checkpoint", "switching", "committed")],
    ("bulk", "qemu", None),
    *[("mirror", "qemu", p) for p in ("switching", "pivoted")],
    ("mirror", "engine", "switching"),
    ("mirror", "qemu", None),
    ("stream", "qemu", None),
]


@pytest.mark.parametrize(("strategy", "who", "point"), CASES)
def test_idle_vm_import_loses_nothing(
    make_engine: Callable[..., Engine],
    nbd_export: Callable[..., qemu_nbd.Server],
    workdir: Path,
    strategy: str,
    who: str,
    point: str | None,
) -> None:
    env = {}
    if point is not None:
        env = {(QEMU_VARIABLE if who == "qemu" else VARIABLE): f"import-{point}"}
    engine = make_engine("qemu:///system", **env)
    source = _source(workdir / "src.raw")
    export = nbd_export(source)
    c = engine.client()
    tmp, final = _domains(c, workdir)
    name = f"dur-{strategy}-{who}-{point or 'after'}"
    c.vms.create(name, disks=[f"{export.url},format=raw,storage=tmp"], memory_mib=64)
    c.vms.start(name)
    job = c.vms.import_(name, to="final", strategy=strategy)
    if who == "engine" and point is not None:
        c = _crash_then_restart(engine, lambda: c.jobs.wait(job.id, timeout=300))
    done = c.jobs.wait(job.id, timeout=300)
    if done.state != "succeeded":
        # QEMU died before the switch: the job says so; started again on its
        # temporary disk, the import run again completes.
        assert "stopped" in (done.error or ""), done
        assert c.vms.get(name).disks[0].location == "external"
        c.vms.start(name)
        done = c.vms.import_(name, to="final").wait(timeout=300)
        assert done.state == "succeeded", done.error
    if c.vms.get(name).state == "running":
        time.sleep(3)  # the moment right after success
        _kill_qemu(name)
    (disk,) = c.vms.get(name).disks
    assert disk.location == "local" and disk.storage_domain == "final"
    assert qemu_img.info(disk.volume_path, disk.volume_format).backing_filename is None
    assert (
        qemu_img.first_difference(str(source), disk.volume_path, "raw", disk.volume_format) is None
    )
    assert list(tmp.iterdir()) == []
    assert [p.name for p in final.iterdir()] == [Path(disk.volume_path).name]
    # The VM starts again from what remains.
    c.vms.start(name)
    assert c.vms.get(name).state == "running"
    c.vms.remove(name, force=True)
    assert list(final.iterdir()) == []


def test_two_disks_then_a_local_disk_moved(
    engine: Engine, nbd_export: Callable[..., qemu_nbd.Server], workdir: Path
) -> None:
    """Both external disks of a VM are imported in one job; then one of them,
    local now, moves to another storage domain while the VM runs (oVirt's move:
    a whole-disk mirror), and back while it is stopped (qemu-img convert)."""
    sources = [_source(workdir / f"src{i}.raw") for i in range(2)]
    exports = [nbd_export(s) for s in sources]
    c = engine.client()
    tmp, final = _domains(c, workdir)
    disks = [f"{e.url},format=raw,storage=tmp" for e in exports]
    c.vms.create("dur-two", disks=disks, memory_mib=64)
    c.vms.start("dur-two")
    assert c.vms.import_("dur-two", to="final").wait(timeout=300).state == "succeeded"

    def check(where: str) -> None:
        vm = c.vms.get("dur-two")
        for disk, source in zip(vm.disks, sources, strict=True):
            assert disk.location == "local"
            assert (
                qemu_img.first_difference(str(source), disk.volume_path, "raw", disk.volume_format)
                is None
            )
        assert vm.disks[1].storage_domain == "final"
        assert vm.disks[0].storage_domain == where

    _kill_qemu("dur-two")
    check("final")
    with pytest.raises(ThinairAPIError, match="local on 'final' already"):
        c.disks.move(c.vms.get("dur-two").disks[0].id, to="final")
    c.vms.start("dur-two")
    vda = c.vms.get("dur-two").disks[0]
    assert c.disks.move(vda.id, to="tmp").wait(timeout=300).state == "succeeded"
    _kill_qemu("dur-two")
    check("tmp")
    assert c.disks.move(vda.id, to="final").wait(timeout=300).state == "succeeded"
    check("final")
    assert list(tmp.iterdir()) == []
    c.vms.remove("dur-two")
    assert list(final.iterdir()) == []


@pytest.mark.parametrize("strategy", ["bulk", "mirror"])
def test_engine_and_qemu_both_die_during_the_switch(
    make_engine: Callable[..., Engine],
    nbd_export: Callable[..., qemu_nbd.Server],
    workdir: Path,
    strategy: str,
) -> None:
    """A power cut as the switch-over begins: the engine dies with the guest
    paused and the copy recorded as the disk, and QEMU dies before the engine
    comes back. The restarted engine finishes the import from its record: the
    copy is the disk, and it holds every byte."""
    engine = make_engine("qemu:///system", **{VARIABLE: "import-switching"})
    source = _source(workdir / "src.raw")
    export = nbd_export(source)
    c = engine.client()
    tmp, final = _domains(c, workdir)
    name = f"dur-both-{strategy}"
    c.vms.create(name, disks=[f"{export.url},format=raw,storage=tmp"], memory_mib=64)
    c.vms.start(name)
    job = c.vms.import_(name, to="final", strategy=strategy)

    with contextlib.suppress(EngineUnreachable):  # the engine dies under the request
        c.jobs.wait(job.id, timeout=300)
    assert engine.proc is not None
    engine.proc.wait(timeout=300)
    assert engine.proc.returncode == -9, engine.log()[-2000:]
    _kill_qemu(name)
    del engine.extra_env[VARIABLE]
    engine.start()
    c = engine.client()
    done = c.jobs.wait(job.id, timeout=300)
    assert done.state == "succeeded", done.error
    (disk,) = c.vms.get(name).disks
    assert disk.location == "local" and disk.storage_domain == "final"
    assert (
        qemu_img.first_difference(str(source), disk.volume_path, "raw", disk.volume_format) is None
    )
    assert list(tmp.iterdir()) == []
    c.vms.remove(name, force=True)
