"""What every flow needs of a VM: find its record, the libvirt connection to its
host, its domain's spec, a temporary disk over an external disk, the bridges its
disks read through, and the two ends of its life on a host (define again,
destroy). The flows (vms, imports, exports, convert) and the reconciler use this
module; none of them calls another's private functions."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from sqlalchemy.orm import Session

from thinair.adapters import qemu_img, qemu_io, v2v, virt
from thinair.adapters.errors import CommandFailed
from thinair.db import refs
from thinair.db.models import LOCAL_HOST_ID, Disk, Vm
from thinair.engine import bridges, import_state
from thinair.engine.context import EngineContext
from thinair.engine.faults import crash_point
from thinair.errors import StorageError

log = logging.getLogger(__name__)


def conversion_log(ctx: EngineContext, name: str) -> Path:
    """virt-v2v's log for the VM named `name` (its XML and scratch sit beside it)."""
    return ctx.settings.home / "v2v" / f"{name}.log"


def find(s: Session, ref: str) -> Vm:
    """By name, id or a unique prefix of its id."""
    return refs.find(s, Vm, ref, "VM")


def virt_of(ctx: EngineContext, vm: Vm) -> virt.Virt:
    """libvirt on the VM's host."""
    return ctx.host_virt(vm.host_id)


def is_local(vm: Vm) -> bool:
    return vm.host_id in (None, LOCAL_HOST_ID)


def create_overlay(ctx: EngineContext, disk: Disk) -> None:
    """The disk's temporary disk, new (over an old one, if any) on its external disk."""
    assert disk.external_url and disk.external_format
    url, fmt = disk.external_url, disk.external_format
    backing, backing_fmt = url, fmt
    # A bridge is a process on this machine: only VMs here read through one.
    if is_local(disk.vm) and bridges.bridged(url, fmt):
        bridges.ensure(ctx, disk.id, url, fmt)
        backing, backing_fmt = bridges.source(ctx, disk.id, url, fmt)
    try:
        qemu_img.create_overlay(disk.volume_path, backing, backing_fmt, disk.virtual_size)
    except CommandFailed as e:
        raise StorageError(f"cannot create {disk.volume_path}: {e.stderr}") from e
    _mark_holes(ctx, disk, backing, backing_fmt)


def _mark_holes(ctx: EngineContext, disk: Disk, source: str, fmt: str) -> None:
    """Mark the external disk's holes as zero clusters in the new overlay.

    The external disk is read-only and never changes, so a hole there reads as
    zeros for good. Recorded in the overlay before any guest runs on it, they
    cost no network reads: not for the guest, and not for an import, which
    otherwise pulls every hole over the wire (QEMU's stream copies them).
    An optimization only: if the map cannot be read, the overlay is still right.
    """
    assert disk.external_url and disk.external_format
    cluster = 64 * 1024
    try:
        holes = qemu_img.zero_ranges(source, fmt, timeout=ctx.settings.probe_timeout)
        aligned = []
        for offset, length in holes:
            start = -(-offset // cluster) * cluster  # whole clusters only
            end = (offset + length) // cluster * cluster
            if end > start:
                aligned.append((start, end - start))
        if aligned:
            qemu_io.write_zeroes(disk.volume_path, aligned)
    except CommandFailed as e:
        log.warning(
            "could not map the holes of %s (%s); reads of them will go to the source",
            disk.external_url,
            e,
        )


def domain_spec(ctx: EngineContext, vm: Vm) -> virt.DomainSpec:
    return virt.DomainSpec(
        name=vm.name,
        uuid=vm.id,
        vm_id=vm.id,
        engine_id=ctx.engine_id,
        memory_mib=vm.memory_mib,
        cpus=vm.cpus,
        domain_type=vm.domain_type,
        console_log=vm.console_log,
        disks=[
            virt.DiskDevice(
                d.target,
                d.volume_path,
                d.volume_format,
                external=d.external_url is not None,
                copy_on_read=d.external_url is not None and ctx.settings.copy_on_read,
            )
            for d in vm.disks
        ],
    )


def destroy(ctx: EngineContext, vm_id: str, keep_conversion_log: bool = False) -> None:
    """Mark the VM removing, then undefine its domain, delete its volumes and its
    logs (console; virt-v2v's unless kept, as when a conversion failed), and last
    its record. Idempotent: the reconciler calls it again for a VM left in phase
    removing, creating or converting."""
    with ctx.db.session() as s:
        vm = s.get(Vm, vm_id)
        if vm is None:
            return
        if vm.phase not in ("creating", "converting"):
            vm.phase = "removing"
        name = vm.name
        paths = [d.volume_path for d in vm.disks] + [vm.console_log]
        v2v_log = conversion_log(ctx, name)
        paths.append(str(v2v.xml_path(v2v_log)))
        if not keep_conversion_log:
            paths.append(str(v2v_log))
        disk_urls = [(d.id, d.external_url) for d in vm.disks]
        host_virt = virt_of(ctx, vm)
    dom = host_virt.lookup(name)
    if dom is not None and host_virt.owner(dom) == (ctx.engine_id, vm_id):
        host_virt.undefine(name)
    crash_point("destroy-undefined")
    for disk_id, url in disk_urls:
        bridges.stop(ctx, disk_id, url)
        import_state.discard(ctx, disk_id)  # a partial copy an import left
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            if path:
                os.unlink(path)
    with ctx.db.session() as s:
        vm = s.get(Vm, vm_id)
        if vm is not None:
            s.delete(vm)
    ctx.events.vm_changed(vm_id, name)


def ensure_bridges(ctx: EngineContext, vm_id: str) -> None:
    """(Re)start the bridges the VM's external NBD disks are read through."""
    with ctx.db.session() as s:
        vm = find(s, vm_id)
        wanted = (
            [(d.id, d.external_url, d.external_format) for d in vm.disks] if is_local(vm) else []
        )
    for disk_id, url, fmt in wanted:
        if url and bridges.bridged(url, fmt):
            bridges.ensure(ctx, disk_id, url, fmt)


def redefine(ctx: EngineContext, vm_id: str) -> None:
    """Define a ready VM's domain again from its record (libvirt lost it)."""
    with ctx.db.session() as s:
        vm = find(s, vm_id)
        virt_of(ctx, vm).define(virt.domain_xml(domain_spec(ctx, vm)))
