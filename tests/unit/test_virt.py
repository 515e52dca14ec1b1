"""Domain XML as libvirt reads it back (test:///default driver), and ownership."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import libvirt
import pytest

from thinair.adapters.errors import AdapterError
from thinair.adapters.virt import (
    DiskDevice,
    DomainDisk,
    DomainSpec,
    Virt,
    VirtError,
    disk_target,
    disks,
    domain_xml,
)
from thinair.errors import BackendError


def spec(name: str = "web1", **kw: object) -> DomainSpec:
    vm_id = str(uuid.uuid4())
    values: dict[str, object] = dict(
        name=name,
        uuid=vm_id,
        vm_id=vm_id,
        engine_id="engine-1",
        memory_mib=256,
        cpus=2,
        domain_type="qemu",
        console_log="/var/log/x.log",
        disks=[DiskDevice("vda", "/sd/a.qcow2"), DiskDevice("vdb", "/sd/b.qcow2")],
    )
    values.update(kw)
    return DomainSpec(**values)  # type: ignore[arg-type]


@pytest.fixture
def virt() -> Iterator[Virt]:
    """The test driver; its state is shared by the whole process, so undo what
    each test defined."""
    v = Virt("test:///default")
    yield v
    for dom in v.conn.listAllDomains():
        if dom.name() != "test":
            v.undefine(dom.name())


def test_xml_defines_and_reads_back(virt: Virt) -> None:
    s = spec()
    virt.define(domain_xml(s))
    live = ET.fromstring(virt.xml("web1"))
    assert live.get("type") == "qemu"
    assert live.findtext("uuid") == s.uuid
    assert live.find("memory").text == str(256 * 1024)  # type: ignore[union-attr]
    assert live.findtext("vcpu") == "2"
    disks = live.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb"]  # type: ignore[union-attr]
    assert [d.find("source").get("file") for d in disks] == ["/sd/a.qcow2", "/sd/b.qcow2"]  # type: ignore[union-attr]
    assert disks[0].find("boot").get("order") == "1"  # type: ignore[union-attr]
    assert live.find("devices/serial/log").get("file") == "/var/log/x.log"  # type: ignore[union-attr]


def test_owner_is_read_from_metadata(virt: Virt) -> None:
    s = spec()
    virt.define(domain_xml(s))
    dom = virt.lookup("web1")
    assert dom is not None
    assert Virt.owner(dom) == ("engine-1", s.vm_id)
    assert virt.owned_domains("engine-1") == {s.vm_id: "web1"}
    assert virt.owned_domains("engine-2") == {}


def test_foreign_domain_has_no_owner(virt: Virt) -> None:
    dom = virt.lookup("test")  # the test driver's own domain
    assert dom is not None
    assert Virt.owner(dom) is None


def test_xml_special_characters_are_escaped() -> None:
    s = spec(console_log="/tmp/a'<b>&\".log", disks=[DiskDevice("vda", "/sd/<evil>&'\"/x.qcow2")])
    root = ET.fromstring(domain_xml(s))  # would raise if not well-formed
    assert root.find("devices/disk/source").get("file") == "/sd/<evil>&'\"/x.qcow2"  # type: ignore[union-attr]


def test_start_stop_undefine(virt: Virt) -> None:
    virt.define(domain_xml(spec()))
    assert virt.state("web1") == "stopped"
    virt.start("web1")
    assert virt.state("web1") == "running"
    virt.stop("web1", force=False, timeout=5)
    assert virt.state("web1") == "stopped"
    virt.start("web1")
    virt.undefine("web1")
    assert virt.state("web1") == "missing"
    virt.undefine("web1")  # idempotent


def test_disk_targets() -> None:
    assert [disk_target(i) for i in (0, 1, 25, 26, 27)] == ["vda", "vdb", "vdz", "vdaa", "vdab"]


def test_domain_type_setting_is_respected(virt: Virt) -> None:
    assert virt.choose_domain_type("kvm") == "kvm"
    assert virt.choose_domain_type("qemu") == "qemu"
    assert virt.choose_domain_type("auto") == "qemu"  # the test driver is not QEMU


def test_lookup_missing(virt: Virt) -> None:
    assert virt.lookup("nope") is None
    with pytest.raises(Exception, match="no domain"):
        virt.start("nope")
    assert libvirt.getVersion() > 0


def test_external_disks_pause_on_error_and_may_copy_on_read() -> None:
    s = spec(
        disks=[
            DiskDevice("vda", "/sd/a.qcow2", external=True, copy_on_read=True),
            DiskDevice("vdb", "/sd/b.qcow2"),
        ]
    )
    drivers = ET.fromstring(domain_xml(s)).findall("devices/disk/driver")
    assert drivers[0].get("error_policy") == "stop" and drivers[0].get("rerror_policy") == "stop"
    assert drivers[0].get("copy_on_read") == "on"
    assert drivers[1].get("error_policy") is None and drivers[1].get("copy_on_read") is None


def test_paused_on_io_error_ignores_a_user_pause(virt: Virt) -> None:
    virt.define(domain_xml(spec("i15")))
    virt.start("i15")
    virt.lookup("i15").suspend()  # type: ignore[union-attr]
    assert virt.paused_on_io_error() == set()
    assert virt.pause_reason("i15") == "user"
    virt.lookup("i15").destroy()  # type: ignore[union-attr]
    virt.undefine("i15")


def test_libvirt_errors_come_out_as_virt_errors(virt: Virt) -> None:
    """A libvirtError leaves virt.py as a VirtError: one of the adapters' errors
    and a BackendError, with the call, libvirt's message and code, and the
    libvirtError as its cause."""
    virt.define(domain_xml(spec()))
    virt.start("web1")
    with pytest.raises(VirtError) as e:
        virt.start("web1")  # running already
    err = e.value
    assert isinstance(err, AdapterError) and isinstance(err, BackendError)
    assert err.code == "backend" and err.call == "virDomainCreate"
    assert err.libvirt_code == libvirt.VIR_ERR_INTERNAL_ERROR  # (the test driver says so)
    assert isinstance(err.__cause__, libvirt.libvirtError)
    assert err.detail == err.__cause__.get_error_message() and err.detail
    assert err.message == f"libvirt could not start web1: {err.__cause__}"
    with pytest.raises(VirtError, match="libvirt could not resume web1") as e:
        virt.resume("web1")  # not paused
    assert e.value.call == "virDomainResume"
    with pytest.raises(VirtError, match="^libvirt refused the domain: ") as e:
        virt.define("<domain type='test'><name>x</name></domain>")  # no memory
    assert e.value.call == "virDomainDefineXML" and isinstance(
        e.value.__cause__, libvirt.libvirtError
    )
    with pytest.raises(VirtError, match="cannot connect to libvirt at test:///nowhere.xml") as e:
        _ = Virt("test:///nowhere.xml").conn
    assert e.value.call == "virConnectOpen"
    # Not libvirt's error but thinair's: no such domain.
    with pytest.raises(BackendError, match="libvirt has no domain nope") as b:
        virt.suspend("nope")
    assert not isinstance(b.value, VirtError)


def test_node_info_and_version(virt: Virt) -> None:
    info = virt.node_info()
    assert info.hypervisor == "TEST" and info.cpus > 0
    assert info.version.count(".") == 2 and virt.version() > 0


LIVE = """<domain type='qemu'><name>x</name><devices>
  <disk type='file' device='disk'>
    <source file='/sd/top.qcow2'/>
    <backingStore type='network' index='1'>
      <source protocol='nbd' name='export'><host name='h' port='10809'/></source>
      <backingStore/>
    </backingStore>
    <target dev='vda' bus='virtio'/>
    <mirror type='file' job='copy' ready='yes'><source file='/sd/new.raw'/></mirror>
  </disk>
  <disk type='file' device='disk'>
    <source file='/sd/b.qcow2'/>
    <backingStore type='file'><source file='/sd/b-base.raw'/><backingStore/></backingStore>
    <target dev='vdb' bus='virtio'/>
    <mirror type='file' job='copy'><source file='/sd/b-new.raw'/></mirror>
  </disk>
  <disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>
  <disk type='file' device='disk'><source file='/sd/no-target.raw'/></disk>
</devices></domain>"""


def test_disks_of_a_live_domain_xml() -> None:
    """The one reader of a domain's disks: chains top first (a network layer as
    protocol://name), and a copy job's readiness."""
    assert disks(LIVE) == [
        DomainDisk("vda", ["/sd/top.qcow2", "nbd://export"], mirror_ready=True),
        DomainDisk("vdb", ["/sd/b.qcow2", "/sd/b-base.raw"], mirror_ready=False),
        DomainDisk("sda", [], mirror_ready=None),
    ]
    assert disks(LIVE)[2].top is None and disks(LIVE)[0].top == "/sd/top.qcow2"


def test_disks_as_libvirt_reads_them_back(virt: Virt) -> None:
    virt.define(domain_xml(spec()))
    assert [(d.target, d.chain) for d in virt.disks("web1", inactive=True)] == [
        ("vda", ["/sd/a.qcow2"]),
        ("vdb", ["/sd/b.qcow2"]),
    ]
    assert virt.disk("web1", "vdb").top == "/sd/b.qcow2"
    assert virt.disk_chain("web1", "vda") == ["/sd/a.qcow2"]
    assert not virt.mirror_ready("web1", "vda")
    with pytest.raises(BackendError, match="web1 has no disk vdc"):
        virt.disk("web1", "vdc")
