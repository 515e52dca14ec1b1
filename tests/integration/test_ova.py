"""OVAs on an engine with libvirt's test driver: the OVF read, each disk probed in
place through nbdkit's tar filter, and every bad OVA refused with its cause
before anything is created."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Engine
from tests.support.foreign import make_ova, ovf
from thinair.adapters import qemu_img
from thinair.client import ThinairAPIError

MIB = 2**20


@pytest.fixture
def vmdk(workdir: Path) -> Path:
    path = workdir / "disk.vmdk"
    subprocess.run(
        [qemu_img.binary(), "create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized"]
        + [str(path), "32M"],
        check=True,
    )
    return path


def _engine(test_engine: Engine, storage_dir: Path) -> Engine:
    test_engine.client().storage_domains.add("sd", str(storage_dir))
    return test_engine


def test_ova_read_in_place(test_engine: Engine, storage_dir: Path, vmdk: Path) -> None:
    ova = make_ova(
        storage_dir.parent / "two.ova",
        ovf("two disks", [("a.vmdk", 32 * MIB), ("b.vmdk", 32 * MIB)], memory_mib=768, cpus=3),
        {"a.vmdk": vmdk, "b.vmdk": vmdk, "two.mf": b"SHA1(a.vmdk)= 0\n"},
    )
    c = _engine(test_engine, storage_dir).client()
    vm = c.vms.create(None, ova=str(ova))
    assert (vm.name, vm.memory_mib, vm.cpus) == ("two-disks", 768, 3)
    assert [d.external_disk.url for d in vm.disks if d.external_disk] == [
        f"tar+file://{ova}#a.vmdk",
        f"tar+file://{ova}#b.vmdk",
    ]
    assert {d.external_disk.format for d in vm.disks if d.external_disk} == {"vmdk"}
    assert {d.virtual_size for d in vm.disks} == {32 * MIB}
    c.vms.rollback(vm.name)
    assert list(storage_dir.iterdir()) == []


def test_bad_ovas_refused(
    test_engine: Engine, storage_dir: Path, vmdk: Path, workdir: Path
) -> None:
    c = _engine(test_engine, storage_dir).client()
    one = [("disk.vmdk", 32 * MIB)]
    descriptor = (
        b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        b'createType="monolithicFlat"\n\nRW 65536 FLAT "/etc/passwd" 0\n'
    )
    compressed = ovf("z", one).replace(
        'ovf:href="disk.vmdk"', 'ovf:href="disk.vmdk" ovf:compression="gzip"'
    )
    cases: list[tuple[str, str, dict[str, Path | bytes], str]] = [
        ("missing", ovf("m", one), {}, "has no disk 'disk.vmdk'"),
        ("outside", ovf("o", [("../x.vmdk", 1)]), {"disk.vmdk": vmdk}, "outside the OVA"),
        (
            "descriptor",
            ovf("d", one),
            {"disk.vmdk": descriptor},
            "extent '/etc/passwd' outside the tar",
        ),
        ("gzip", compressed, {"disk.vmdk": vmdk}, r"compressed \(gzip\)"),
        ("badxml", "<Envelope", {"disk.vmdk": vmdk}, "not valid XML"),
    ]
    for name, text, members, words in cases:
        ova = make_ova(workdir / f"{name}.ova", text, members)
        with pytest.raises(ThinairAPIError, match=words):
            c.vms.create(f"fx-{name}", ova=str(ova))
    gz = workdir / "whole.ova"
    gz.write_bytes(gzip.compress((workdir / "missing.ova").read_bytes()))
    with pytest.raises(ThinairAPIError, match="not a plain tar"):
        c.vms.create("fx-gz", ova=str(gz))
    with pytest.raises(ThinairAPIError, match="cannot read"):
        c.vms.create("fx-none", ova=str(workdir / "none.ova"))
    with pytest.raises(ThinairAPIError, match="either disks or an ova"):
        c.vms.create("fx-both", disks=[str(vmdk)], ova=str(gz))
    assert c.vms.list() == []
    assert list(storage_dir.iterdir()) == []
