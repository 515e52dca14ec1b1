"""libvirt: domain XML, define/start/stop/undefine, and who owns a domain.

Every domain thinair defines carries its VM id in <metadata> (namespace NS), so
the reconciler can tell thinair's domains from anyone else's and never touches a
domain it did not create.

Every libvirt call thinair makes goes through this module (and snapshot.py,
built on it): a libvirtError comes out as a VirtError, one of the adapters'
errors (thinair.adapters.errors) and a thinair BackendError, carrying the call,
libvirt's message and code, and the libvirtError as its cause.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import libvirt

from thinair.adapters.errors import AdapterError
from thinair.errors import BackendError

log = logging.getLogger(__name__)

NS = "https://thinair.dev/xmlns/vm/1"
NS_PREFIX = "thinair"

# libvirt prints every error to stderr by default; we raise them instead.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class VirtError(AdapterError, BackendError):
    """A libvirt call failed: `call` names it, `detail` is libvirt's message and
    `libvirt_code` its error code (libvirt.VIR_ERR_*)."""

    def __init__(self, message: str, call: str, error: libvirt.libvirtError) -> None:
        super().__init__(message, call, error.get_error_message() or str(error))
        self.libvirt_code = error.get_error_code()


@contextlib.contextmanager
def calling(call: str, what: str = "libvirt") -> Iterator[None]:
    """Turn a libvirtError raised inside into a VirtError saying `what: libvirt's
    message` (what: "libvirt could not start vm1", ...)."""
    try:
        yield
    except libvirt.libvirtError as e:
        raise VirtError(f"{what}: {e}", call, e) from e


_event_loop_lock = threading.Lock()
_event_loop_started = False


def _ensure_event_loop() -> None:
    """libvirt's default event loop, in a daemon thread: block job events need it.
    It must be registered before the first connection is opened."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


# Block job outcomes as libvirt's BLOCK_JOB_2 event reports them.
JOB_COMPLETED = "completed"
JOB_FAILED = "failed"
JOB_CANCELED = "canceled"
JOB_READY = "ready"
_JOB_STATUS = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: JOB_COMPLETED,
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: JOB_FAILED,
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: JOB_CANCELED,
    libvirt.VIR_DOMAIN_BLOCK_JOB_READY: JOB_READY,
}


# Domain lifecycle events (LIFECYCLE) as the state the domain is in afterwards.
_LIFECYCLE_STATE = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: "running",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "paused",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "running",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "stopping",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "missing",
}

# Called with (domain UUID, domain name, state) from libvirt's event thread.
LifecycleListener = Callable[[str, str, str], None]


class BlockJobEvents:
    """The last block job event per (domain UUID, disk target), with a condition
    to wait on, so a flow learns of ready/completed/failed from libvirt itself."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._last: dict[tuple[str, str], str] = {}

    def record(self, dom_uuid: str, target: str, status: str) -> None:
        with self._cond:
            self._last[(dom_uuid, target)] = status
            self._cond.notify_all()

    def clear(self, dom_uuid: str, target: str) -> None:
        with self._cond:
            self._last.pop((dom_uuid, target), None)

    def wait(self, dom_uuid: str, target: str, timeout: float) -> str | None:
        """The event seen for the disk, waiting up to `timeout` for one."""
        with self._cond:
            self._cond.wait_for(lambda: (dom_uuid, target) in self._last, timeout)
            return self._last.get((dom_uuid, target))


@dataclass(frozen=True)
class DiskDevice:
    target: str  # vda, vdb, ...
    path: str
    format: str = "qcow2"
    # The disk reads an external source (its overlay's backing file is remote):
    # a read or write error pauses the VM instead of reaching the guest (a guest
    # given EIO remounts read-only, corrupts or panics), and the engine resumes
    # it once the source answers again (thinair.engine.outages).
    external: bool = False
    # QEMU writes what the guest reads from the backing file into the overlay
    # (libvirt's copy_on_read), so no block crosses the link twice.
    copy_on_read: bool = False


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    vm_id: str
    engine_id: str
    memory_mib: int
    cpus: int
    domain_type: str
    console_log: str
    disks: list[DiskDevice] = field(default_factory=list)


def domain_xml(spec: DomainSpec) -> str:
    """The domain's XML. ElementTree escapes every value, so no name or path can
    inject XML."""
    dom = ET.Element("domain", type=spec.domain_type)
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "uuid").text = spec.uuid
    meta = ET.SubElement(dom, "metadata")
    owner = ET.SubElement(meta, f"{{{NS}}}vm")
    ET.SubElement(owner, f"{{{NS}}}id").text = spec.vm_id
    ET.SubElement(owner, f"{{{NS}}}engine").text = spec.engine_id
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(spec.cpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    for index, disk in enumerate(spec.disks):
        d = ET.SubElement(devices, "disk", type="file", device="disk")
        driver = ET.SubElement(d, "driver", name="qemu", type=disk.format, discard="unmap")
        if disk.external:
            driver.set("error_policy", "stop")
            driver.set("rerror_policy", "stop")
        if disk.copy_on_read:
            driver.set("copy_on_read", "on")
        ET.SubElement(d, "source", file=disk.path)
        ET.SubElement(d, "target", dev=disk.target, bus="virtio")
        if index == 0:
            ET.SubElement(d, "boot", order="1")
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "log", file=spec.console_log, append="off")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    ET.SubElement(devices, "memballoon", model="none")
    ET.register_namespace(NS_PREFIX, NS)
    return ET.tostring(dom, encoding="unicode")


def disk_target(index: int) -> str:
    """vda, vdb, ... vdz, vdaa, ... as libvirt names virtio disks."""
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return "vd" + letters


@dataclass(frozen=True)
class DomainDisk:
    """A disk as a domain's XML shows it."""

    target: str  # vda, vdb, ...
    # Its chain, top first: file paths, or PROTOCOL://NAME for network layers.
    chain: list[str]
    # A block copy's state on the disk: None with no copy, else whether libvirt
    # says it reached its ready phase.
    mirror_ready: bool | None = None

    @property
    def top(self) -> str | None:
        return self.chain[0] if self.chain else None


def disks(xml: str) -> list[DomainDisk]:
    """The disks of a domain's XML (live or inactive), in its order. The one
    reader of <devices><disk>: chains, targets and mirrors come from here."""
    found = []
    for disk in ET.fromstring(xml).iterfind("devices/disk"):
        tgt = disk.find("target")
        if tgt is None or not tgt.get("dev"):
            continue
        chain = []
        node: ET.Element | None = disk
        while node is not None and (src := node.find("source")) is not None:
            if src.get("file"):
                chain.append(src.get("file", ""))
            else:
                chain.append(f"{src.get('protocol')}://{src.get('name', '')}")
            node = node.find("backingStore")
        mirror = disk.find("mirror")
        ready = None if mirror is None else mirror.get("ready") == "yes"
        found.append(DomainDisk(target=tgt.get("dev", ""), chain=chain, mirror_ready=ready))
    return found


@dataclass(frozen=True)
class NodeInfo:
    """What a host's libvirt says of itself."""

    hypervisor: str  # QEMU, TEST, ...
    version: str  # the hypervisor's, major.minor.micro
    cpus: int


class Console:
    """A domain's serial console as a blocking byte stream, both ways."""

    def __init__(self, stream: libvirt.virStream) -> None:
        self._stream = stream

    def recv(self, size: int) -> bytes:
        """Up to `size` bytes the guest wrote; b"" once the stream ended."""
        with calling("virStreamRecv", "libvirt console"):
            data = self._stream.recv(size)
        return data if isinstance(data, bytes) else b""

    def send(self, data: bytes) -> None:
        with calling("virStreamSend", "libvirt console"):
            self._stream.send(data)

    def abort(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.abort()


class Virt:
    """One libvirt connection, reopened when libvirtd went away."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()
        self.block_events = BlockJobEvents()
        # Told of every domain state change libvirt reports; it must not call
        # libvirt (it runs in libvirt's event thread).
        self.on_lifecycle: LifecycleListener | None = None

    @property
    def conn(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                log.info("libvirt connection to %s lost; reconnecting", self.uri)
            _ensure_event_loop()
            with calling("virConnectOpen", f"cannot connect to libvirt at {self.uri}"):
                conn = libvirt.open(self.uri)
            with contextlib.suppress(libvirt.libvirtError):  # the test driver has no jobs
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job, None
                )
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
                )
            self._conn = conn
            return conn

    def version(self) -> int:
        """The hypervisor's version (major * 1,000,000 + minor * 1000 + micro): a
        cheap call that shows libvirt answers."""
        with calling("virConnectGetVersion", f"libvirt at {self.uri}"):
            return int(self.conn.getVersion())

    def node_info(self) -> NodeInfo:
        conn = self.conn
        with calling("virNodeGetInfo", f"libvirt at {self.uri}"):
            cpus = int(conn.getInfo()[2])
            version = int(conn.getVersion())
            hypervisor = str(conn.getType())
        major, minor, micro = version // 1_000_000, version // 1000 % 1000, version % 1000
        return NodeInfo(hypervisor=hypervisor, version=f"{major}.{minor}.{micro}", cpus=cpus)

    def wait_connected(self, timeout: float) -> None:
        """Wait for libvirtd to answer again (it may be restarting); BackendError
        if it does not within `timeout` seconds. QEMU keeps running meanwhile and
        libvirtd takes its domains and block jobs back when it starts."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with calling("virConnectGetLibVersion"):
                    self.conn.getLibVersion()
                return
            except BackendError as e:
                if time.monotonic() > deadline:
                    raise BackendError(
                        f"libvirt at {self.uri} did not come back in {timeout:g} s"
                    ) from e
                time.sleep(0.5)

    def _on_block_job(
        self,
        _conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        target: str,
        _job_type: int,
        status: int,
        _opaque: object,
    ) -> None:
        name = _JOB_STATUS.get(status)
        if name:
            log.info("block job on %s %s: %s", dom.name(), target, name)
            self.block_events.record(dom.UUIDString(), target, name)

    def _on_lifecycle(
        self,
        _conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        event: int,
        _detail: int,
        _opaque: object,
    ) -> None:
        state = _LIFECYCLE_STATE.get(event)
        listener = self.on_lifecycle
        if state is None or listener is None:
            return
        try:
            listener(dom.UUIDString(), dom.name(), state)
        except Exception:  # never into libvirt's event loop
            log.exception("lifecycle listener failed")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None

    def choose_domain_type(self, setting: str) -> str:
        """`kvm` where a guest can run under KVM, `qemu` (TCG) elsewhere."""
        if setting in ("kvm", "qemu"):
            return setting
        with calling("virConnectGetType"):
            if self.conn.getType() != "QEMU":
                return "qemu"
        # The paravirtual KVM of some sandboxes (kvm_pvm) runs SeaBIOS but hangs
        # stock guest kernels: TCG is the only thing that boots there.
        if os.path.exists("/sys/module/kvm_pvm") or not os.path.exists("/dev/kvm"):
            return "qemu"
        try:
            self.conn.getDomainCapabilities(None, "x86_64", None, "kvm")
        except libvirt.libvirtError:
            return "qemu"
        return "kvm"

    def free_memory_mib(self) -> int:
        """Memory a new guest can have: free plus page cache and buffers (the kernel
        gives those back). Where the driver has no memory statistics (libvirt's
        test driver): the host's memory less what its running domains use."""
        return self.memory_mib()[1]

    def memory_mib(self) -> tuple[int, int]:
        """(total, free as in free_memory_mib) in MiB, both from the same source:
        virNodeGetInfo's memory can be less than the node's statistics say (it
        counts NUMA cells, not a container's or balloon's view), and a free figure
        above the total is nonsense."""
        conn = self.conn
        with calling("virNodeGetMemoryStats"):
            try:
                stats = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
                kib = stats["free"] + stats.get("buffers", 0) + stats.get("cached", 0)
                total = int(stats["total"] // 1024)
                return total, min(total, int(kib // 1024))
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
            total = int(conn.getInfo()[1])
            used_kib = sum(dom.info()[2] for dom in conn.listAllDomains() if dom.isActive())
            return total, max(0, total - used_kib // 1024)

    def open_console(self, name: str) -> Console:
        """A blocking stream to the domain's serial console, both ways, as `virsh
        console` opens it (taking it over from another client that holds it)."""
        dom = self._get(name)
        with calling("virDomainOpenConsole", f"libvirt could not open the console of {name}"):
            stream = self.conn.newStream(0)
            dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        return Console(stream)

    def lookup(self, name: str) -> libvirt.virDomain | None:
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise VirtError(f"libvirt: {e}", "virDomainLookupByName", e) from e

    @staticmethod
    def owner(dom: libvirt.virDomain) -> tuple[str, str] | None:
        """(engine id, VM id) from a domain's metadata; None for a domain thinair
        did not define."""
        try:
            text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS)
        except libvirt.libvirtError:
            return None
        root = ET.fromstring(text)
        vm_id, engine_id = root.findtext("id"), root.findtext("engine")
        if not vm_id or not engine_id:
            return None
        return engine_id, vm_id

    def owned_domains(self, engine_id: str) -> dict[str, str]:
        """{VM id: domain name} for every domain the given engine defined."""
        owned = {}
        with calling("virConnectListAllDomains"):
            for dom in self.conn.listAllDomains():
                owner = self.owner(dom)
                if owner and owner[0] == engine_id:
                    owned[owner[1]] = dom.name()
        return owned

    def define(self, xml: str) -> None:
        with calling("virDomainDefineXML", "libvirt refused the domain"):
            self.conn.defineXML(xml)

    def state(self, name: str) -> str:
        dom = self.lookup(name)
        if dom is None:
            return "missing"
        with calling("virDomainGetState"):
            state = dom.state()[0]
        return _STATES.get(state, "unknown")

    def states(self) -> dict[str, str]:
        """Every domain's state by name, in one call (for listings)."""
        with calling("virConnectGetAllDomainStats"):
            try:
                stats = self.conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE)
            except libvirt.libvirtError:  # drivers without bulk stats (the test driver)
                return {
                    d.name(): _STATES.get(d.state()[0], "unknown")
                    for d in self.conn.listAllDomains()
                }
        return {dom.name(): _STATES.get(st.get("state.state", 0), "unknown") for dom, st in stats}

    def start(self, name: str) -> None:
        dom = self._get(name)
        with calling("virDomainCreate", f"libvirt could not start {name}"):
            dom.create()

    def paused_on_io_error(self) -> set[str]:
        """The names of the domains QEMU paused because a disk read or write
        failed (libvirt's state reason "I/O error")."""
        try:
            stats = self.conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE)
            return {
                dom.name()
                for dom, st in stats
                if st.get("state.state") == libvirt.VIR_DOMAIN_PAUSED
                and st.get("state.reason") == libvirt.VIR_DOMAIN_PAUSED_IOERROR
            }
        except libvirt.libvirtError:  # drivers without bulk stats (the test driver)
            pass
        with calling("virConnectListAllDomains"):
            return {
                d.name()
                for d in self.conn.listAllDomains()
                if d.state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR]
            }

    def pause_reason(self, name: str) -> str | None:
        """Why libvirt says a paused domain is paused ("I/O error", "user", ...)."""
        dom = self.lookup(name)
        if dom is None:
            return None
        try:
            state, reason = dom.state()
        except libvirt.libvirtError:
            return None
        if state != libvirt.VIR_DOMAIN_PAUSED:
            return None
        return _PAUSE_REASONS.get(reason, "unknown")

    def disk_errors(self, name: str) -> dict[str, str]:
        """{disk target: "no space" or "error"} for the disks whose I/O failed
        since the domain last ran (QEMU keeps the last error of each)."""
        with calling("virDomainGetDiskErrors"):
            errors = self._get(name).diskErrors()
        return {
            target: "no space" if code == libvirt.VIR_DOMAIN_DISK_ERROR_NO_SPACE else "error"
            for target, code in errors.items()
            if code != libvirt.VIR_DOMAIN_DISK_ERROR_NONE
        }

    def suspend(self, name: str) -> None:
        dom = self._get(name)
        with calling("virDomainSuspend", f"libvirt could not pause {name}"):
            dom.suspend()

    def resume(self, name: str) -> None:
        dom = self._get(name)
        with calling("virDomainResume", f"libvirt could not resume {name}"):
            dom.resume()

    def _active(self, dom: libvirt.virDomain) -> bool:
        with calling("virDomainIsActive"):
            return bool(dom.isActive())

    def stop(self, name: str, force: bool, timeout: float) -> None:
        """Shut down (ACPI, waiting up to `timeout`) or destroy with `force`."""
        dom = self._get(name)
        if not self._active(dom):
            return
        try:
            if force:
                dom.destroy()
                return
            dom.shutdown()
        except libvirt.libvirtError as e:
            if not self._active(dom):
                return
            call = "virDomainDestroy" if force else "virDomainShutdown"
            raise VirtError(f"libvirt could not stop {name}: {e}", call, e) from e
        deadline = time.monotonic() + timeout
        while self._active(dom):
            if time.monotonic() > deadline:
                raise BackendError(
                    f"{name} did not shut down within {timeout:g} s; stop it with --force"
                )
            time.sleep(0.2)

    def undefine(self, name: str) -> None:
        dom = self.lookup(name)
        if dom is None:
            return
        try:
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(0)
        except libvirt.libvirtError as e:
            if self.lookup(name) is None:
                return
            raise VirtError(f"libvirt could not remove {name}: {e}", "virDomainUndefine", e) from e

    def xml(self, name: str, inactive: bool = False) -> str:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        dom = self._get(name)
        with calling("virDomainGetXMLDesc"):
            return str(dom.XMLDesc(flags))

    def disks(self, name: str, inactive: bool = False) -> list[DomainDisk]:
        """The domain's disks, as it runs now or (`inactive`) as it is defined."""
        return disks(self.xml(name, inactive))

    def disk(self, name: str, target: str, inactive: bool = False) -> DomainDisk:
        for disk in self.disks(name, inactive):
            if disk.target == target:
                return disk
        raise BackendError(f"{name} has no disk {target}")

    def uuid(self, name: str) -> str:
        dom = self._get(name)
        with calling("virDomainGetUUIDString"):
            return str(dom.UUIDString())

    # -- block jobs (import) --------------------------------------------------

    def disk_chain(self, name: str, target: str) -> list[str]:
        """The live chain of a disk, top first: file paths, or protocol://name
        for network layers."""
        return self.disk(name, target).chain

    def mirror_ready(self, name: str, target: str) -> bool:
        """libvirt's own word that a copy job reached the ready phase."""
        return any(d.target == target and d.mirror_ready for d in self.disks(name))

    def block_job(self, name: str, target: str) -> tuple[int, int] | None:
        """(bytes done, bytes total) of the disk's active block job, or None."""
        dom = self._get(name)
        with calling("virDomainGetBlockJobInfo"):
            info = dom.blockJobInfo(target, 0)
        if not info:
            return None
        return int(info["cur"]), int(info["end"])

    def block_copy(
        self,
        name: str,
        target: str,
        dest: str,
        dest_format: str,
        bandwidth: int | None,
        shallow: bool,
        reuse_external: bool,
    ) -> None:
        """Start a copy of the disk (its whole chain unless `shallow`) to `dest`,
        with synchronous writes once ready so it converges under any guest load."""
        dom = self._get(name)
        dest_xml = ET.Element("disk", type="file", device="disk")
        ET.SubElement(dest_xml, "driver", name="qemu", type=dest_format)
        ET.SubElement(dest_xml, "source", file=dest)
        params: dict[str, int] = {}
        if bandwidth:
            params[libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH] = bandwidth
        flags = (
            libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
            | libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES
        )
        if shallow:
            flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW
        if reuse_external:
            flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
        self.block_events.clear(self.uuid(name), target)
        with calling("virDomainBlockCopy", f"libvirt could not start copying {name} {target}"):
            dom.blockCopy(target, ET.tostring(dest_xml, encoding="unicode"), params, flags)

    def block_pull(self, name: str, target: str, bandwidth: int | None) -> None:
        """Start pulling the backing chain's data into the top image."""
        dom = self._get(name)
        self.block_events.clear(self.uuid(name), target)
        with calling("virDomainBlockRebase", f"libvirt could not start pulling {name} {target}"):
            dom.blockRebase(
                target, None, bandwidth or 0, libvirt.VIR_DOMAIN_BLOCK_REBASE_BANDWIDTH_BYTES
            )

    def block_commit(self, name: str, target: str, base: str) -> None:
        """Start an active, shallow commit of the disk's top layer into `base`
        (the layer right under it): a copy job that ends in a pivot."""
        dom = self._get(name)
        self.block_events.clear(self.uuid(name), target)
        flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
        with calling("virDomainBlockCommit", f"libvirt could not merge {name} {target} back"):
            dom.blockCommit(target, base, None, 0, flags)

    def block_job_abort(self, name: str, target: str, pivot: bool = False) -> None:
        dom = self._get(name)
        flags = libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT if pivot else 0
        what = "switch" if pivot else "cancel the copy of"
        with calling("virDomainBlockJobAbort", f"libvirt could not {what} {name} {target}"):
            dom.blockJobAbort(target, flags)

    def snapshot_disk(self, name: str, target: str, overlay: str) -> None:
        """From now on the guest's writes to `target` go to a new qcow2 `overlay`
        (libvirt makes it, backed by the current top): a disk-only snapshot
        without metadata, of that one disk."""
        snap = ET.Element("domainsnapshot")
        listed = ET.SubElement(snap, "disks")
        for disk in self.disks(name):
            if disk.target == target:
                el = ET.SubElement(listed, "disk", name=disk.target, snapshot="external")
                el.set("type", "file")
                ET.SubElement(el, "driver", type="qcow2")
                ET.SubElement(el, "source", file=overlay)
            else:
                ET.SubElement(listed, "disk", name=disk.target, snapshot="no")
        flags = (
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        )
        dom = self._get(name)
        with calling("virDomainSnapshotCreateXML", f"libvirt could not snapshot {name} {target}"):
            dom.snapshotCreateXML(ET.tostring(snap, encoding="unicode"), flags)

    def wait_block_event(self, name: str, target: str, timeout: float) -> str | None:
        return self.block_events.wait(self.uuid(name), target, timeout)

    def _get(self, name: str) -> libvirt.virDomain:
        dom = self.lookup(name)
        if dom is None:
            raise BackendError(f"libvirt has no domain {name}")
        return dom


_PAUSE_REASONS = {
    libvirt.VIR_DOMAIN_PAUSED_USER: "user",
    libvirt.VIR_DOMAIN_PAUSED_MIGRATION: "migration",
    libvirt.VIR_DOMAIN_PAUSED_SAVE: "save",
    libvirt.VIR_DOMAIN_PAUSED_DUMP: "dump",
    libvirt.VIR_DOMAIN_PAUSED_IOERROR: "I/O error",
    libvirt.VIR_DOMAIN_PAUSED_WATCHDOG: "watchdog",
    libvirt.VIR_DOMAIN_PAUSED_SNAPSHOT: "snapshot",
    libvirt.VIR_DOMAIN_PAUSED_SHUTTING_DOWN: "shutting down",
    libvirt.VIR_DOMAIN_PAUSED_STARTING_UP: "starting up",
}

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "unknown",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "stopping",
    libvirt.VIR_DOMAIN_SHUTOFF: "stopped",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}
