"""Across hosts: a second libvirtd in a network namespace of its own stands in
for another machine, reached over qemu+tcp://. A VM defined there boots from an
export the engine serves here, over the link between the two."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.conftest import Engine
from tests.e2e.conftest import wait_console
from tests.support.netns_host import NetnsHost

pytestmark = pytest.mark.guest


@pytest.fixture
def second_host(workdir: Path) -> Iterator[NetnsHost]:
    host = NetnsHost(workdir / "host-b")
    try:
        host.start()
        yield host
    finally:
        host.stop()


def test_vm_on_another_host_boots_from_an_export_here(
    engine: Engine, second_host: NetnsHost, guest_image: Path, storage_dir: Path
) -> None:
    c = engine.client()
    engine.cli("host", "add", "b", second_host.uri, check=True)
    b = c.hosts.get("b")
    assert b.reachable and b.hypervisor == "QEMU" and b.vms == 0
    c.storage_domains.add("shared", str(storage_dir))  # the same path on both hosts
    export = c.exports.create(
        image=str(guest_image), format="raw", listen=second_host.here, tls="none"
    )
    assert export.warning and "anyone on the network" in export.warning
    assert export.url.startswith(f"nbd://{second_host.here}:")

    vm = c.vms.create("so-xhost", [f"{export.url},format=raw"], memory_mib=128, host="b")
    assert vm.host == "b"
    assert c.vms.start("so-xhost").state == "running"

    remote = libvirt.open(second_host.uri)
    here = libvirt.open("qemu:///system")
    try:
        dom = remote.lookupByName("so-xhost")
        assert dom.isActive() and dom.UUIDString() == vm.id
        with pytest.raises(libvirt.libvirtError):
            here.lookupByName("so-xhost")
        # QEMU over there reads the export here directly, across the link.
        live = ET.fromstring(dom.XMLDesc(0))
        source = live.find("devices/disk/backingStore/source")
        assert source is not None and source.get("protocol") == "nbd"
        host = source.find("host")
        assert host is not None and host.get("name") == second_host.here

        info = wait_console(c, "so-xhost", lambda i: i["boot_ok"] and len(i["wrote"]) >= 2)
        assert info["disks"] and info["disks"][0]["name"] == "vda"
        served = c.exports.get(export.id)
        assert served.clients and served.bytes_read

        # Import there: the disk becomes local to the shared domain.
        job = c.vms.import_("so-xhost", to="shared").wait(timeout=600)
        assert job.state == "succeeded", job.error
        (disk,) = c.vms.get("so-xhost").disks
        assert disk.location == "local" and disk.external_disk is None
        after = ET.fromstring(dom.XMLDesc(0))  # no backing file left over there
        assert after.find("devices/disk/backingStore/source") is None

        c.vms.stop("so-xhost", force=True)
        c.vms.remove("so-xhost")
        assert "so-xhost" not in [d.name() for d in remote.listAllDomains()]
    finally:
        remote.close()
        here.close()
    assert list(storage_dir.iterdir()) == []
    assert c.exports.list() == []  # the import released the export it read from
    c.hosts.remove("b")
    assert [h.name for h in c.hosts.list()] == ["local"]


def test_start_resumes_a_vm_paused_on_another_host(
    engine: Engine, second_host: NetnsHost, guest_image: Path, storage_dir: Path
) -> None:
    """`vm start` of a paused VM resumes it where it runs: on its own host, not
    through the local libvirt (which has no such domain)."""
    c = engine.client()
    engine.cli("host", "add", "b", second_host.uri, check=True)
    c.storage_domains.add("shared", str(storage_dir))
    export = c.exports.create(
        image=str(guest_image), format="raw", listen=second_host.here, tls="none"
    )
    c.vms.create("a16-paused", [f"{export.url},format=raw"], memory_mib=128, host="b")
    assert c.vms.start("a16-paused").state == "running"
    remote = libvirt.open(second_host.uri)
    try:
        dom = remote.lookupByName("a16-paused")
        dom.suspend()
        assert c.vms.get("a16-paused").state == "paused"
        assert c.vms.start("a16-paused").state == "running"
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        c.vms.stop("a16-paused", force=True)
        c.vms.remove("a16-paused")
    finally:
        remote.close()
