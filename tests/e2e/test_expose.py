"""A VM run by libvirt boots from a thinair export of the guest image: the
export is what another host would use as an external disk (NBD, or HTTP range
requests through QEMU's curl driver), it counts the VM as a client, and it is
gone without a trace after unexpose. And a running VM's disk is exposed as it
was at one instant while the guest goes on writing, then merged back with
nothing lost."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import nbd
import pytest

from tests.conftest import Engine
from tests.e2e.conftest import image_reader, sha256, wait_console
from tests.support import guest
from tests.support.exports import port_open, server_processes, stop_servers
from thinair import models
from thinair.adapters import qemu_nbd
from thinair.client import ThinairAPIError

pytestmark = pytest.mark.guest


@pytest.fixture(autouse=True)
def no_servers_left(workdir: Path) -> Iterator[None]:
    yield
    stop_servers(f"{workdir}/")


@pytest.mark.parametrize("protocol", ["nbd", "http"])
def test_vm_boots_from_an_export(
    engine: Engine, guest_image: Path, storage_dir: Path, protocol: str
) -> None:
    source_sum = sha256(guest_image)
    done = engine.cli("expose", str(guest_image), "--protocol", protocol, "--json", check=True)
    export = models.Export.model_validate_json(done.stdout)
    assert export.state == "running" and export.port is not None

    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    vm = c.vms.create("exp1", disks=[f"{export.url},format=raw"], memory_mib=256)
    assert vm.disks[0].external_disk is not None
    assert vm.disks[0].external_disk.url == export.url
    c.vms.start("exp1")
    info = wait_console(c, "exp1", lambda i: i["boot_ok"] and i["pattern_md5"] is not None)
    assert info["pattern_md5"] == guest.expected_pattern_md5()
    assert info["disks"][0]["size"] == guest.IMAGE_SIZE
    if protocol == "nbd":
        # The running VM is a client of the export (QEMU keeps its connection open).
        assert c.exports.get(export.id).clients == 1

    c.vms.rollback("exp1")
    done = engine.cli("unexpose", export.id, check=True)
    assert not port_open(export.port)
    assert not server_processes(f"{engine.home}/exports/")
    assert list((engine.home / "exports").iterdir()) == []
    assert c.exports.list() == []
    assert sha256(guest_image) == source_sum


def _disk_source(name: str, inactive: bool = False) -> str | None:
    conn = libvirt.open("qemu:///system")
    try:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        src = ET.fromstring(conn.lookupByName(name).XMLDesc(flags)).find("devices/disk/source")
        return None if src is None else src.get("file")
    finally:
        conn.close()


def _nbd_reader(url: str) -> tuple[nbd.NBD, Callable[[int, int], bytes]]:
    handle = nbd.NBD()
    handle.connect_uri(url)

    def read(offset: int, length: int) -> bytes:
        step = 4 * 2**20
        return b"".join(
            handle.pread(min(step, offset + length - pos), pos)
            for pos in range(offset, offset + length, step)
        )

    return handle, read


def test_expose_a_running_vms_disk(
    engine: Engine, guest_export: qemu_nbd.Server, storage_dir: Path
) -> None:
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    vm = c.vms.create("snap1", disks=[guest_export.url], memory_mib=256)
    volume = vm.disks[0].volume_path
    c.vms.start("snap1")
    before = set(wait_console(c, "snap1", lambda i: len(i["wrote"]) >= 2)["wrote"])

    done = engine.cli("expose", "--vm", "snap1", "--disk", "vda", "--json", check=True)
    export = models.Export.model_validate_json(done.stdout)
    assert export.vm_id == vm.id and export.disk == "vda" and export.name == "snap1-vda"
    assert export.image == volume and export.format == "qcow2"
    # The guest writes to a new overlay now; its volume is frozen and served.
    top = _disk_source("snap1")
    assert top is not None and top != volume and top.startswith(f"{volume}.exposed-")
    frozen_at = max(guest.parse_console(c.vms.console("snap1").text)["wrote"])
    wait_console(c, "snap1", lambda i: max(i["wrote"]) >= frozen_at + 3)

    handle, read = _nbd_reader(export.url)
    frozen = {r.seq for r in guest.decode_records(read)}
    # Every write acknowledged before the freeze is there, none of the later ones.
    assert before <= frozen
    assert max(frozen) <= frozen_at + 1
    # The whole chain is served (the pattern lives in the external disk).
    pattern = read(guest.PATTERN_OFFSET, guest.PATTERN_SIZE)
    assert pattern == guest.expected_pattern()
    # Still the same instant after the guest wrote more.
    now = max(guest.parse_console(c.vms.console("snap1").text)["wrote"])
    wait_console(c, "snap1", lambda i: max(i["wrote"]) >= now + 2)
    assert {r.seq for r in guest.decode_records(read)} == frozen
    with pytest.raises(nbd.Error):
        handle.pwrite(b"x" * 512, 0)
    handle.shutdown()

    # The VM is held while its disk is exposed, across an engine restart too.
    with pytest.raises(ThinairAPIError, match="busy"):
        c.vms.stop("snap1", force=True)
    engine.stop()
    engine.start()
    assert c.exports.get(export.id).pid == export.pid
    with pytest.raises(ThinairAPIError, match="busy"):
        c.vms.stop("snap1", force=True)

    # Unexpose merges the overlay back: the VM is on its own volume again, now
    # and at its next boot, and the overlay file is gone.
    engine.cli("unexpose", export.name, check=True)
    assert _disk_source("snap1") == volume
    assert _disk_source("snap1", inactive=True) == volume
    assert [p.name for p in storage_dir.iterdir()] == [Path(volume).name]
    assert not server_processes(f"{engine.home}/exports/")

    # The guest goes on, and nothing it ever wrote was lost.
    now = max(guest.parse_console(c.vms.console("snap1").text)["wrote"])
    wait_console(c, "snap1", lambda i: max(i["wrote"]) >= now + 2)
    c.vms.stop("snap1", force=True)
    wrote = guest.parse_console(c.vms.console("snap1").text)["wrote"]
    with image_reader(volume) as read_volume:
        records = {r.seq for r in guest.decode_records(read_volume)}
    assert set(wrote) <= records
    c.vms.rollback("snap1")
    assert list(storage_dir.iterdir()) == []
