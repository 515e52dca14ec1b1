"""VMs: create (probe, overlays, define), start, stop, remove and rollback.

Each flow writes its intent (the VM's phase) before it touches anything, and
each step is idempotent, so a crash anywhere leaves a state the reconciler can
finish or undo. A flow that fails half way undoes what it did.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from thinair import models
from thinair.adapters import qemu_img, qemu_io, v2v, virt
from thinair.adapters._process import CommandFailed
from thinair.db.models import Disk, StorageDomain, Vm, new_id
from thinair.engine import bridges, convert, ova, storage
from thinair.engine.context import EngineContext
from thinair.engine.faults import crash_point
from thinair.engine.probe import Probed, probe
from thinair.errors import BackendError, Conflict, InvalidInput, NotFound, StorageError
from thinair.external import DiskSpec, parse_url, validate_format

log = logging.getLogger(__name__)

CONSOLE_CHUNK = 256 * 1024


# -- reading -----------------------------------------------------------------


def find(s: Session, ref: str) -> Vm:
    vm = s.scalar(select(Vm).where((Vm.name == ref) | (Vm.id == ref)))
    if vm is None:
        raise NotFound(f"no VM {ref!r}")
    return vm


def disk_model(disk: Disk) -> models.Disk:
    external = None
    if disk.external_url:
        external = models.ExternalDisk(url=disk.external_url, format=disk.external_format)
    return models.Disk(
        id=disk.id,
        vm_id=disk.vm_id,
        target=disk.target,
        storage_domain=disk.storage_domain.name,
        volume_path=disk.volume_path,
        volume_format=disk.volume_format,
        virtual_size=disk.virtual_size,
        location="external" if disk.external_url else "local",
        external_disk=external,
    )


def to_model(ctx: EngineContext, vm: Vm, state: str | None = None) -> models.Vm:
    if vm.phase in ("creating", "converting"):
        state = vm.phase
    elif state is None:
        state = ctx.virt.state(vm.name)
    return models.Vm(
        id=vm.id,
        name=vm.name,
        state=state,
        phase=vm.phase,
        memory_mib=vm.memory_mib,
        cpus=vm.cpus,
        domain_type=vm.domain_type,
        disks=[disk_model(d) for d in vm.disks],
        last_start_seconds=vm.last_start_seconds,
        created_at=vm.created_at,
    )


def list_all(ctx: EngineContext) -> list[models.Vm]:
    states = ctx.virt.states()
    with ctx.db.session() as s:
        vms = s.scalars(
            select(Vm)
            .order_by(Vm.name)
            .options(selectinload(Vm.disks).selectinload(Disk.storage_domain))
        )
        return [to_model(ctx, vm, states.get(vm.name, "missing")) for vm in vms]


def get(ctx: EngineContext, ref: str) -> models.Vm:
    with ctx.db.session() as s:
        return to_model(ctx, find(s, ref))


def console(ctx: EngineContext, ref: str, offset: int) -> models.Console:
    """The guest's serial console from byte `offset` on (libvirt's virtlogd writes it)."""
    if offset < 0:
        raise InvalidInput("offset must be >= 0")
    with ctx.db.session() as s:
        path = find(s, ref).console_log
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if offset > size:  # the log was truncated by a new start
                offset = 0
            f.seek(offset)
            data = f.read(CONSOLE_CHUNK)
    except FileNotFoundError:
        return models.Console(text="", offset=0)
    return models.Console(text=data.decode(errors="replace"), offset=offset + len(data))


# -- create ------------------------------------------------------------------


def _resolve_storage(s: Session, ref: str | None) -> StorageDomain:
    if ref is not None:
        return storage.find(s, ref)
    domains = list(s.scalars(select(StorageDomain)))
    if len(domains) == 1:
        return domains[0]
    if not domains:
        raise NotFound("no storage domain: add one with `thinair storage add NAME PATH`")
    raise InvalidInput("several storage domains exist: say which one with storage=NAME")


def probe_disk(ctx: EngineContext, req: models.ProbeRequest) -> models.ProbeResult:
    """Ask an external disk's server what it holds, creating nothing (the check
    `create` does, on its own: for a form that checks a URL as it is typed)."""
    validate_format(req.format)
    spec = DiskSpec(url=req.url, format=req.format, check_readonly=req.check_readonly)
    p = probe(spec, ctx.settings.probe_timeout, lambda url: bridges.temporary(ctx, url))
    return models.ProbeResult(
        url=p.url, format=p.format, virtual_size=p.virtual_size, read_only=p.read_only
    )


def _from_ova(ctx: EngineContext, req: models.VmCreate) -> models.VmCreate:
    """The request with the OVA's disks, and its name, memory and CPUs where
    the request does not give them."""
    assert req.ova is not None
    appliance = ova.read(ctx, req.ova)
    given = req.model_fields_set
    return models.VmCreate(
        name=req.name or appliance.name,
        memory_mib=req.memory_mib if "memory_mib" in given else appliance.memory_mib or 512,
        cpus=req.cpus if "cpus" in given else appliance.cpus or 1,
        disks=[
            models.DiskCreate(
                external_disk=models.ExternalDisk(url=url), storage_domain=req.storage_domain
            )
            for url in appliance.disks
        ],
        convert=req.convert,
    )


def create(ctx: EngineContext, req: models.VmCreate) -> models.Vm:
    """Check everything, then create the overlays and define the domain."""
    if req.ova:
        req = _from_ova(ctx, req)
    assert req.name is not None
    if req.convert:
        convert.check_available(ctx)
    specs = [
        DiskSpec(
            url=d.external_disk.url,
            format=d.external_disk.format,
            storage=d.storage_domain,
            check_readonly=d.check_readonly,
        )
        for d in req.disks
    ]
    for spec in specs:  # cheap checks first
        for path in parse_url(spec.url).local_files:
            storage.check_image_root(ctx, path, "disk image" if path == spec.url else "file")
        validate_format(spec.format)
    with ctx.db.session() as s:
        if s.scalar(select(Vm).where(Vm.name == req.name)):
            raise Conflict(f"VM {req.name!r} exists already")
        domains = [_resolve_storage(s, spec.storage) for spec in specs]
        for sd in {sd.id: sd for sd in domains}.values():
            storage.check_space(ctx, sd)
    if ctx.virt.lookup(req.name) is not None:
        raise Conflict(f"libvirt already has a domain named {req.name!r} (not thinair's)")
    probed: list[Probed] = [
        probe(spec, ctx.settings.probe_timeout, lambda url: bridges.temporary(ctx, url))
        for spec in specs
    ]

    # Record the intent, with every path we are about to create, before creating it.
    with ctx.db.session() as s:
        vm = Vm(
            id=new_id(),
            name=req.name,
            memory_mib=req.memory_mib,
            cpus=req.cpus,
            phase="creating",
            domain_type=ctx.domain_type,
            console_log="",
        )
        vm.console_log = str(ctx.settings.console_dir / f"{vm.id}.log")
        for index, (sd, p) in enumerate(zip(domains, probed, strict=True)):
            disk = Disk(
                id=new_id(),
                position=index,
                target=virt.disk_target(index),
                storage_domain_id=sd.id,
                volume_format="qcow2",
                virtual_size=p.virtual_size,
                external_url=p.url,
                external_format=p.format,
                external_read_only=p.read_only,
                volume_path="",
            )
            disk.volume_path = str(Path(sd.path) / f"{disk.id}.qcow2")
            vm.disks.append(disk)
        s.add(vm)
        s.flush()
        vm_id = vm.id
    try:
        with ctx.vm_busy(vm_id, "create"):
            _materialize(ctx, vm_id)
            with ctx.db.session() as s:
                vm = find(s, vm_id)
                # A VM to convert is not ready before virt-v2v has run over its overlays.
                vm.phase = "converting" if req.convert else "ready"
                model = to_model(ctx, vm)
        if req.convert:
            convert.submit(ctx, vm_id)
        return model
    except BaseException:
        log.exception("creating VM %s failed; undoing", req.name)
        _destroy(ctx, vm_id)  # whatever it got to: domain (if ours), volumes, record
        raise


def _materialize(ctx: EngineContext, vm_id: str) -> None:
    with ctx.db.session() as s:
        vm = find(s, vm_id)
        for disk in vm.disks:
            create_overlay(ctx, disk)
        crash_point("create-overlays")
        ctx.virt.define(virt.domain_xml(domain_spec(ctx, vm)))
    crash_point("create-defined")


def create_overlay(ctx: EngineContext, disk: Disk) -> None:
    """The disk's temporary disk, new (over an old one, if any) on its external disk."""
    assert disk.external_url and disk.external_format
    url, fmt = disk.external_url, disk.external_format
    if bridges.bridged(url, fmt):
        bridges.ensure(ctx, disk.id, url, fmt)
    backing, backing_fmt = bridges.source(ctx, disk.id, url, fmt)
    try:
        qemu_img.create_overlay(disk.volume_path, backing, backing_fmt, disk.virtual_size)
    except CommandFailed as e:
        raise StorageError(f"cannot create {disk.volume_path}: {e.stderr}") from None
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
        disks=[virt.DiskDevice(d.target, d.volume_path, d.volume_format) for d in vm.disks],
    )


# -- start / stop ------------------------------------------------------------


def _ready(s: Session, ref: str) -> Vm:
    vm = find(s, ref)
    if vm.phase != "ready":
        raise Conflict(f"VM {vm.name!r} is {vm.phase}")
    return vm


def start(ctx: EngineContext, ref: str) -> models.Vm:
    with ctx.db.session() as s:
        vm = _ready(s, ref)
        vm_id, name = vm.id, vm.name
    with ctx.vm_busy(vm_id, "start"):
        state = ctx.virt.state(name)
        if state == "running":
            raise Conflict(f"VM {name!r} is running already")
        if state == "paused":
            # QEMU pauses a guest whose write met a full disk: go on once there is space.
            ctx.virt.resume(name)
            return get(ctx, vm_id)
        if state == "missing":
            raise BackendError(
                f"libvirt lost the domain of {name!r}; restart the engine to have it defined again"
            )
        ensure_bridges(ctx, vm_id)
        crash_point("start-bridges")
        began = time.monotonic()
        ctx.virt.start(name)
        took = time.monotonic() - began
        with ctx.db.session() as s:
            vm = find(s, vm_id)
            vm.last_start_seconds = round(took, 3)
            return to_model(ctx, vm)


def stop(ctx: EngineContext, ref: str, req: models.VmStop) -> models.Vm:
    with ctx.db.session() as s:
        vm = _ready(s, ref)
        vm_id, name = vm.id, vm.name
    with ctx.vm_busy(vm_id, "stop"):
        if ctx.virt.state(name) not in ("stopped", "missing"):
            ctx.virt.stop(name, force=req.force, timeout=req.timeout or ctx.settings.stop_timeout)
    return get(ctx, vm_id)


# -- remove / rollback -------------------------------------------------------


def remove(ctx: EngineContext, ref: str, force: bool = False) -> None:
    """Remove a VM and every volume thinair made for it (temporary or imported)."""
    with ctx.db.session() as s:
        vm = find(s, ref)
        vm_id, name = vm.id, vm.name
    if not force and ctx.virt.state(name) not in ("stopped", "missing"):
        raise Conflict(f"VM {name!r} is running: stop it first, or remove it with --force")
    _cancel_jobs(ctx, vm_id)
    with ctx.vm_busy(vm_id, "remove"):
        _destroy(ctx, vm_id)


def rollback(ctx: EngineContext, ref: str) -> None:
    """Stop the VM and discard its temporary disks; the external disks were never
    written, so nothing else changes."""
    with ctx.db.session() as s:
        vm = find(s, ref)
        vm_id, name = vm.id, vm.name
        local = [d.target for d in vm.disks if not d.external_url]
    if local:
        raise Conflict(
            f"{name}: disk {', '.join(local)} is local already (imported); there is "
            "nothing to roll back to: use `vm remove` to delete the VM"
        )
    _cancel_jobs(ctx, vm_id)
    with ctx.vm_busy(vm_id, "rollback"):
        _destroy(ctx, vm_id)


def _cancel_jobs(ctx: EngineContext, vm_id: str) -> None:
    """An import in progress is cancelled (the VM goes back to its temporary
    disks) before the VM is rolled back or removed."""
    if ctx.jobs is not None:
        ctx.jobs.cancel_and_wait(vm_id)


def _destroy(ctx: EngineContext, vm_id: str, keep_conversion_log: bool = False) -> None:
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
        conversion_log = convert.log_path(ctx, name)
        paths.append(str(v2v.xml_path(conversion_log)))
        if not keep_conversion_log:
            paths.append(str(conversion_log))
        disk_ids = [d.id for d in vm.disks]
    dom = ctx.virt.lookup(name)
    if dom is not None and ctx.virt.owner(dom) == (ctx.engine_id, vm_id):
        ctx.virt.undefine(name)
    crash_point("destroy-undefined")
    for disk_id in disk_ids:
        bridges.stop(ctx, disk_id)
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            if path:
                os.unlink(path)
    with ctx.db.session() as s:
        vm = s.get(Vm, vm_id)
        if vm is not None:
            s.delete(vm)


def ensure_bridges(ctx: EngineContext, vm_id: str) -> None:
    """(Re)start the bridges the VM's external NBD disks are read through."""
    with ctx.db.session() as s:
        wanted = [(d.id, d.external_url, d.external_format) for d in find(s, vm_id).disks]
    for disk_id, url, fmt in wanted:
        if url and bridges.bridged(url, fmt):
            bridges.ensure(ctx, disk_id, url, fmt)


def redefine(ctx: EngineContext, vm_id: str) -> None:
    """Define a ready VM's domain again from its record (libvirt lost it)."""
    with ctx.db.session() as s:
        vm = find(s, vm_id)
        ctx.virt.define(virt.domain_xml(domain_spec(ctx, vm)))
