"""Run a VM out of thin air, end to end: real libvirtd, QEMU, qemu-nbd and a guest
that boots from the remote disk, writes to it, and is rolled back without a trace."""

from __future__ import annotations

import signal
import sqlite3
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import libvirt
import pytest

from tests.conftest import Engine
from tests.e2e.conftest import image_reader, sha256, wait_console
from tests.support import guest
from thinair.adapters import procfs, qemu_img, qemu_nbd
from thinair.client import ThinairAPIError

pytestmark = pytest.mark.guest


def domain(name: str) -> libvirt.virDomain | None:
    conn = libvirt.open("qemu:///system")
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        return None


def test_boot_from_nbd_export_then_rollback(
    engine: Engine, guest_export: qemu_nbd.Server, guest_image: Path, storage_dir: Path
) -> None:
    source_sum = sha256(guest_image)
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    done = engine.cli(
        "vm",
        "create",
        "web1",
        "--memory",
        "256",
        "--disk",
        f"{guest_export.url},format=raw,storage=tmp",
        check=True,
    )
    assert "web1" in done.stdout
    vm = c.vms.start("web1")
    assert vm.state == "running"
    assert vm.last_start_seconds is not None and vm.last_start_seconds > 0

    # libvirt shows the overlay's network backing store: the local bridge that
    # reads the remote export (and would ride out a restart of its server).
    live = ET.fromstring(domain("web1").XMLDesc(0))  # type: ignore[union-attr]
    backing = live.find("devices/disk/backingStore")
    assert backing is not None and backing.get("type") == "network"
    source = backing.find("source")
    assert source is not None and source.get("protocol") == "nbd"
    host = source.find("host")
    socket = engine.home / "bridges" / f"{vm.disks[0].id}.sock"
    assert host is not None and host.get("transport") == "unix"
    assert host.get("socket") == str(socket)
    bridge = procfs.find(frozenset({"nbdkit"}), str(socket))
    assert len(bridge) == 1 and f"uri={guest_export.url}" in next(iter(bridge.values()))
    assert live.find("devices/disk/source").get("file") == vm.disks[0].volume_path  # type: ignore[union-attr]

    # The guest booted from the remote disk and reads its data right.
    info = wait_console(c, "web1", lambda i: i["boot_ok"] and len(i["wrote"]) >= 3)
    assert info["pattern_md5"] == guest.expected_pattern_md5()
    assert info["disks"][0]["name"] == "vda"
    assert info["disks"][0]["size"] == guest.IMAGE_SIZE

    # Its writes landed in the overlay, and only there.
    c.vms.stop("web1", force=True)
    wrote = guest.parse_console(c.vms.console("web1").text)["wrote"]
    with image_reader(vm.disks[0].volume_path) as read:
        records = guest.decode_records(read)
    assert set(wrote) <= {r.seq for r in records}
    assert sha256(guest_image) == source_sum

    # Roll back: nothing thinair made is left; the source never changed.
    done = engine.cli("vm", "rollback", "web1", check=True)
    assert "rolled back" in done.stdout
    assert domain("web1") is None
    assert list(storage_dir.iterdir()) == []
    assert not Path(vm.disks[0].volume_path).exists()
    assert c.vms.list() == []
    assert list(engine.settings.console_dir.iterdir()) == []
    assert procfs.find(frozenset({"nbdkit"}), str(engine.home)) == {}  # bridge stopped
    assert sha256(guest_image) == source_sum


def test_rollback_of_a_running_vm(
    engine: Engine, guest_export: qemu_nbd.Server, storage_dir: Path
) -> None:
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    c.vms.create("run1", disks=[guest_export.url], memory_mib=256)
    c.vms.start("run1")
    wait_console(c, "run1", lambda i: i["boot_ok"])
    c.vms.rollback("run1")
    assert domain("run1") is None
    assert list(storage_dir.iterdir()) == []


def test_two_disks(
    engine: Engine,
    guest_export: qemu_nbd.Server,
    workdir: Path,
    storage_dir: Path,
    nbd_export: Callable[..., qemu_nbd.Server],
) -> None:
    data = workdir / "data.qcow2"
    qemu_img.create(str(data), "qcow2", 48 * 2**20)
    second = nbd_export(data, fmt="raw")  # the qcow2 file's bytes; the engine probes qcow2
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    vm = c.vms.create("two", disks=[guest_export.url, second.url], memory_mib=256)
    assert [d.external_disk.format for d in vm.disks if d.external_disk] == ["raw", "qcow2"]
    c.vms.start("two")
    info = wait_console(c, "two", lambda i: i["boot_ok"] and len(i["disks"]) == 2)
    assert [(d["name"], d["size"]) for d in info["disks"]] == [
        ("vda", guest.IMAGE_SIZE),
        ("vdb", 48 * 2**20),
    ]
    assert info["disks"][1]["head_md5"] == "b6d81b360a5672d80c27430f39153e2c"  # 1 MiB of zeros
    c.vms.rollback("two")
    assert list(storage_dir.iterdir()) == []


def test_graceful_stop_and_restart_keeps_writes(
    engine: Engine, guest_export: qemu_nbd.Server, storage_dir: Path
) -> None:
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    c.vms.create("gs", disks=[guest_export.url], memory_mib=256)
    c.vms.start("gs")
    first = wait_console(c, "gs", lambda i: i["boot_ok"] and len(i["wrote"]) >= 2)["wrote"]
    vm = c.vms.stop("gs", timeout=60)  # ACPI power button; the guest powers off
    assert vm.state == "stopped"
    c.vms.start("gs")
    # The second boot continues after the first boot's records: they were kept.
    info = wait_console(c, "gs", lambda i: i["boot_ok"] and len(i["wrote"]) >= 1)
    assert min(info["wrote"]) > max(first)
    c.vms.remove("gs", force=True)
    assert list(storage_dir.iterdir()) == []


def test_bad_inputs_create_nothing(
    engine: Engine, guest_export: qemu_nbd.Server, storage_dir: Path, guest_image: Path
) -> None:
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    conn = libvirt.open("qemu:///system")
    foreign = conn.defineXML(
        "<domain type='qemu'><name>someone-elses</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64'>hvm</type></os></domain>"
    )
    try:
        port = qemu_nbd.free_port()
        cases = [
            (dict(name="someone-elses", disks=[guest_export.url]), "not thinair's"),
            (dict(name="x", disks=[f"nbd://127.0.0.1:{port}/disk"]), "Connection refused"),
            (
                dict(name="x", disks=[f"nbd://127.0.0.1:{guest_export.port}/other"]),
                "no export named",
            ),
            (dict(name="x", disks=[f"{guest_export.url},format=qcow2"]), "not in qcow2 format"),
            (dict(name="x", disks=["nbd:///nohost"]), "has no host"),
            (dict(name="x", disks=[f"{guest_export.url},storage=missing"]), "no storage domain"),
        ]
        for kwargs, words in cases:
            with pytest.raises(ThinairAPIError) as e:
                c.vms.create(**kwargs)  # type: ignore[arg-type]
            assert words in e.value.message, (kwargs, e.value.message)
        assert c.vms.list() == []
        assert list(storage_dir.iterdir()) == []
        assert domain("x") is None
        assert domain("someone-elses") is not None  # not touched
    finally:
        foreign.undefine()
        conn.close()


def test_reconciler_finishes_and_undoes_after_a_crash(
    engine: Engine, guest_export: qemu_nbd.Server, storage_dir: Path
) -> None:
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    half = c.vms.create("half-created", disks=[guest_export.url], memory_mib=128)
    lost = c.vms.create("lost-domain", disks=[guest_export.url], memory_mib=128)
    engine.stop(signal.SIGKILL)

    # The crash left "half-created" mid-create, and someone undefined "lost-domain".
    db = sqlite3.connect(engine.home / "thinair.db")
    db.execute("UPDATE vms SET phase='creating' WHERE name='half-created'")
    db.commit()
    db.close()
    domain("lost-domain").undefine()  # type: ignore[union-attr]
    # An orphan: a domain carrying this engine's id but no record.
    half_domain = domain("half-created")
    assert half_domain is not None
    orphan_xml = (
        half_domain.XMLDesc(0)
        .replace("half-created", "orphan")
        .replace(half.id, "00000000-0000-4000-8000-000000000000")
    )
    conn = libvirt.open("qemu:///system")
    conn.defineXML(orphan_xml)
    conn.close()

    engine.start()
    assert [vm.name for vm in c.vms.list()] == ["lost-domain"]
    assert domain("half-created") is None
    assert domain("orphan") is None
    assert not Path(half.disks[0].volume_path).exists()
    assert domain("lost-domain") is not None
    assert c.vms.get("lost-domain").state == "stopped"
    c.vms.remove("lost-domain")
    assert not Path(lost.disks[0].volume_path).exists()
    assert list(storage_dir.iterdir()) == []
