"""libvirt: freeze one disk of a running domain behind an external overlay
(a disk-only snapshot without metadata), and merge the overlay back (an active,
shallow block commit, then a pivot). With these a running VM's disk can be
exposed as it was at one instant while the guest goes on writing.

Built on the connection and block-job events of thinair.adapters.virt.Virt.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import libvirt

from thinair.adapters import qemu_img
from thinair.adapters._process import CommandFailed, run
from thinair.adapters.virt import JOB_COMPLETED, JOB_FAILED, JOB_READY, Virt
from thinair.errors import BackendError


def freeze(virt: Virt, name: str, target: str, overlay: str) -> None:
    """The guest's writes to `target` go to a new qcow2 `overlay` (libvirt makes
    it, backed by the current top) from now on; other disks are not touched."""
    dom = virt.lookup(name)
    if dom is None:
        raise BackendError(f"libvirt has no domain {name}")
    snap = ET.Element("domainsnapshot")
    disks = ET.SubElement(snap, "disks")
    for disk in ET.fromstring(dom.XMLDesc(0)).iterfind("devices/disk"):
        tgt = disk.find("target")
        if tgt is None:
            continue
        dev = tgt.get("dev", "")
        if dev == target:
            el = ET.SubElement(disks, "disk", name=dev, snapshot="external", type="file")
            ET.SubElement(el, "driver", type="qcow2")
            ET.SubElement(el, "source", file=overlay)
        else:
            ET.SubElement(disks, "disk", name=dev, snapshot="no")
    flags = (
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    )
    try:
        dom.snapshotCreateXML(ET.tostring(snap, encoding="unicode"), flags)
    except libvirt.libvirtError as e:
        raise BackendError(f"libvirt could not snapshot {name} {target}: {e}") from None


def merge_back(virt: Virt, name: str, target: str, base: str, timeout: float = 600) -> None:
    """Commit the disk's top layer into `base` (the layer right under it) while
    the guest runs, and switch the guest back to `base`."""
    dom = virt.lookup(name)
    if dom is None:
        raise BackendError(f"libvirt has no domain {name}")
    virt.block_events.clear(dom.UUIDString(), target)
    flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
    try:
        dom.blockCommit(target, base, None, 0, flags)
    except libvirt.libvirtError as e:
        raise BackendError(f"libvirt could not merge {name} {target} back: {e}") from None
    deadline = time.monotonic() + timeout
    # Ready means the base holds everything and mirrors new writes: only then pivot.
    while not virt.mirror_ready(name, target):
        status = virt.wait_block_event(name, target, 1.0)
        if status == JOB_FAILED:
            raise BackendError(f"merging {name} {target} back failed")
        if time.monotonic() > deadline:
            raise BackendError(f"merging {name} {target} back took more than {timeout:g} s")
        if status == JOB_READY:  # the event can come before the XML says so
            time.sleep(0.05)
    virt.block_events.clear(dom.UUIDString(), target)
    virt.block_job_abort(name, target, pivot=True)
    while virt.block_job(name, target) is not None:
        status = virt.wait_block_event(name, target, 1.0)
        if status == JOB_COMPLETED:
            break
        if status == JOB_FAILED:
            raise BackendError(f"switching {name} {target} back failed")
        if time.monotonic() > deadline:
            raise BackendError(f"switching {name} {target} back took more than {timeout:g} s")


def merge_back_offline(overlay: str) -> None:
    """Commit a stopped guest's overlay into the layer under it (qemu-img)."""
    try:
        run([qemu_img.binary(), "commit", "-q", overlay])
    except CommandFailed as e:
        raise BackendError(f"cannot merge {overlay} back: {e}") from None
