"""Blank disks: an empty qcow2 volume made with the VM, local from the start.
Rollback deletes it with the temporary disks (it is part of what the VM made);
an imported disk still makes rollback refuse. On libvirt's test driver, with
real qemu-img volumes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Engine
from thinair.adapters import qemu_img
from thinair.client import ThinairAPIError
from thinair.external import parse_size


def test_sizes_as_virt_install_and_qemu_img_spell_them() -> None:
    assert parse_size("10") == 10 * 2**30  # a bare number is GiB, as virt-install
    assert parse_size("0.5") == 2**29
    assert parse_size("512M") == parse_size("512MiB") == parse_size("512mb") == 2**29
    assert parse_size("2T") == 2 * 2**40
    assert parse_size("1K") == 1024
    assert parse_size("0.3") % 512 == 0 and parse_size("0.3") >= 0.3 * 2**30


def test_create_start_rollback_remove(
    test_engine: Engine, storage_dir: Path, raw_image: Path
) -> None:
    c = test_engine.client()
    c.storage_domains.add("sd", str(storage_dir))
    vm = c.vms.create("bl-one", disks=[str(raw_image), "size=32M"])
    boot, data = vm.disks
    assert (boot.target, boot.location, boot.blank) == ("vda", "external", False)
    assert (data.target, data.location, data.blank) == ("vdb", "local", True)
    assert data.external_disk is None and data.virtual_size == 32 * 2**20
    info = qemu_img.info(data.volume_path)
    assert info.format == "qcow2" and info.backing_filename is None
    assert info.virtual_size == 32 * 2**20
    assert Path(data.volume_path).parent == storage_dir
    assert c.request("GET", "/vms/bl-one")["disks"][1]["blank"] is True

    # Nothing to move: the blank disk is local on "sd" already.
    with pytest.raises(ThinairAPIError, match="local on 'sd' already") as e:
        c.disks.move(data.id, to="sd")
    assert e.value.code == "conflict"

    # Rollback: the blank disk was made with the VM, so it goes with it.
    assert c.vms.start("bl-one").state == "running"
    c.vms.rollback("bl-one")
    assert c.vms.list() == [] and list(storage_dir.iterdir()) == []

    # Remove: the same.
    c.vms.create("bl-one", disks=[str(raw_image), "size=32M,storage=sd"])
    assert len(list(storage_dir.iterdir())) == 2
    c.vms.remove("bl-one")
    assert c.vms.list() == [] and list(storage_dir.iterdir()) == []


def test_imported_disk_still_blocks_rollback(
    test_engine: Engine, storage_dir: Path, raw_image: Path
) -> None:
    c = test_engine.client()
    c.storage_domains.add("sd", str(storage_dir))
    vm = c.vms.create("bl-imp", disks=[str(raw_image), "size=16M"])
    job = c.vms.import_("bl-imp", to="sd").wait(timeout=120)
    assert job.state == "succeeded", job.error
    assert job.params["disks"] == [vm.disks[0].id]  # the blank disk is not copied
    disks = c.vms.get("bl-imp").disks
    assert [(d.location, d.blank) for d in disks] == [("local", False), ("local", True)]
    files = sorted(storage_dir.iterdir())
    with pytest.raises(ThinairAPIError) as e:
        c.vms.rollback("bl-imp")
    assert e.value.code == "conflict"
    assert "disk vda is local already (imported)" in e.value.message
    assert "vdb" not in e.value.message  # the blank one is not the reason
    assert sorted(storage_dir.iterdir()) == files and c.vms.get("bl-imp")
    c.vms.remove("bl-imp")
    assert list(storage_dir.iterdir()) == []


def test_blank_only_vm_from_the_cli(test_engine: Engine, storage_dir: Path, workdir: Path) -> None:
    test_engine.cli("storage", "add", "sd", str(storage_dir), check=True)
    done = test_engine.cli(
        "vm", "create", "bl-cli", "--disk", "size=0.5", "--disk", "size=64M", "--json", check=True
    )
    vm = json.loads(done.stdout)
    assert [(d["target"], d["virtual_size"], d["blank"]) for d in vm["disks"]] == [
        ("vda", 2**29, True),
        ("vdb", 64 * 2**20, True),
    ]
    shown = test_engine.cli("vm", "show", "bl-cli", check=True).stdout
    assert "local (blank)" in shown
    importing = test_engine.cli("vm", "import", "bl-cli", "--to", "sd")
    assert importing.returncode == 1 and "no external disk to import" in importing.stderr
    test_engine.cli("vm", "rollback", "bl-cli", check=True)
    assert list(storage_dir.iterdir()) == []


def test_blank_disk_that_does_not_fit(
    make_engine: Callable[..., Engine], storage_dir: Path, raw_image: Path
) -> None:
    """Bigger than the domain's free space: a 4xx that says so, and nothing made."""
    c = make_engine("test:///default").client()
    c.storage_domains.add("sd", str(storage_dir))
    free = c.storage_domains.get("sd").free_bytes
    assert free
    too_big = (free // 2**30 + 1) * 2**30
    with pytest.raises(ThinairAPIError) as e:
        c.vms.create("bl-big", disks=[str(raw_image), f"size={too_big // 2**30}"])
    assert e.value.status == 400 and e.value.code == "invalid_input"
    assert "do not fit on storage domain 'sd'" in e.value.message
    # Two that fit one by one but not together: refused as well.
    half = too_big // 2 // 2**20 * 2**20
    with pytest.raises(ThinairAPIError, match="do not fit"):
        c.vms.create("bl-big", disks=[f"size={half // 2**20}M", f"size={half // 2**20}M"])
    assert c.vms.list() == [] and list(storage_dir.iterdir()) == []


def test_blank_disk_on_a_full_domain(make_engine: Callable[..., Engine], storage_dir: Path) -> None:
    engine = make_engine("test:///default", THINAIR_MIN_FREE_MIB=str(2**40))
    c = engine.client()
    c.storage_domains.add("sd", str(storage_dir))
    with pytest.raises(ThinairAPIError) as e:
        c.vms.create("bl-full", disks=["size=1M"])
    assert e.value.status == 400 and "do not fit on storage domain 'sd'" in e.value.message
    assert "0.00 GiB free" in e.value.message
    assert c.vms.list() == [] and list(storage_dir.iterdir()) == []
