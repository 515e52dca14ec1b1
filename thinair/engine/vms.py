"""VMs: create (probe, overlays, define), start, stop, remove and rollback.

Each flow writes its intent (the VM's phase) before it touches anything, and
each step is idempotent, so a crash anywhere leaves a state the reconciler can
finish or undo. A flow that fails half way undoes what it did.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import select
from sqlalchemy.orm import Session

from thinair import models
from thinair.adapters import qemu_img, virt
from thinair.adapters.errors import CommandFailed
from thinair.db import refs
from thinair.db.models import LOCAL_HOST, LOCAL_HOST_ID, Disk, Host, StorageDomain, Vm, new_id
from thinair.engine import bridges, convert, hosts, import_state, machines, ova, storage
from thinair.engine.context import EngineContext
from thinair.engine.faults import crash_point
from thinair.engine.probe import Probed, probe
from thinair.errors import BackendError, Conflict, InvalidInput, NotFound, StorageError
from thinair.external import DiskSpec, validate_format

log = logging.getLogger(__name__)

CONSOLE_CHUNK = 256 * 1024


# -- reading -----------------------------------------------------------------


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
        blank=disk.blank,
    )


def to_model(ctx: EngineContext, vm: Vm, state: str | None = None) -> models.Vm:
    if vm.phase in ("creating", "converting"):
        state = vm.phase
    elif state is None:
        state = machines.virt_of(ctx, vm).state(vm.name)
    return models.Vm(
        id=vm.id,
        name=vm.name,
        state=state,
        phase=vm.phase,
        memory_mib=vm.memory_mib,
        cpus=vm.cpus,
        domain_type=vm.domain_type,
        disks=[disk_model(d) for d in vm.disks],
        host=vm.host.name if vm.host else LOCAL_HOST,
        last_start_seconds=vm.last_start_seconds,
        pause_reason=_pause_reason(ctx, vm.id, vm.name, vm.host_id) if state == "paused" else None,
        created_at=vm.created_at,
    )


def _pause_reason(ctx: EngineContext, vm_id: str, name: str, host_id: str | None) -> str | None:
    reason = ctx.outages.reason(vm_id) if ctx.outages else None
    if reason is None:
        try:
            why = ctx.host_virt(host_id).pause_reason(name)
        except BackendError:
            why = None
        reason = f"paused ({why})" if why else None
    return reason


# A page (a listing with a limit) of at most this many VMs of one host asks
# libvirt for each one's state; a whole listing, or a larger page, asks for every
# domain's state on the host in one call (which, with thousands of domains, costs
# more than a page's worth of lookups).
STATES_ONE_BY_ONE = 200
_VMS = TypeAdapter(list[models.Vm])


def list_all(
    ctx: EngineContext, limit: int | None = None, after: str | None = None
) -> list[models.Vm]:
    """The VMs by name; with `limit`, at most that many, from the first whose
    name sorts after `after` (a page: the next one starts after its last name)."""
    return _VMS.validate_python(list_rows(ctx, limit, after))


def list_rows(
    ctx: EngineContext, limit: int | None = None, after: str | None = None
) -> list[dict[str, Any]]:
    """What list_all gives, as the dicts of models.Vm's JSON (for the API, which
    serializes them with no model in between).

    Read as plain columns in two queries (the VMs with their host's name, their
    disks with their storage domain's name), not as ORM objects: a listing of
    thousands is then a few milliseconds of SQL, not a hundred of loading."""
    vm_query = (
        select(
            Vm.id,
            Vm.name,
            Vm.phase,
            Vm.memory_mib,
            Vm.cpus,
            Vm.domain_type,
            Vm.host_id,
            Vm.last_start_seconds,
            Vm.created_at,
            Host.name,
        )
        .outerjoin(Host, Host.id == Vm.host_id)
        .order_by(Vm.name)
    )
    page = select(Vm.id).order_by(Vm.name)
    if after is not None:
        vm_query, page = vm_query.where(Vm.name > after), page.where(Vm.name > after)
    if limit is not None:
        vm_query, page = vm_query.limit(limit), page.limit(limit)
    disk_query = (
        select(
            Disk.vm_id,
            Disk.id,
            Disk.target,
            StorageDomain.name,
            Disk.volume_path,
            Disk.volume_format,
            Disk.virtual_size,
            Disk.external_url,
            Disk.external_format,
            Disk.blank,
        )
        .join(StorageDomain, StorageDomain.id == Disk.storage_domain_id)
        .order_by(Disk.vm_id, Disk.position)
    )
    with ctx.db.session() as s:
        rows = s.execute(vm_query).all()
        if limit is not None or after is not None:
            disk_query = disk_query.where(Disk.vm_id.in_(page.scalar_subquery()))
        disks: dict[str, list[dict[str, Any]]] = {}
        for vm_id, *d in s.execute(disk_query):
            disks.setdefault(vm_id, []).append(
                {
                    "id": d[0],
                    "vm_id": vm_id,
                    "target": d[1],
                    "storage_domain": d[2],
                    "volume_path": d[3],
                    "volume_format": d[4],
                    "virtual_size": d[5],
                    "location": "external" if d[6] else "local",
                    "external_disk": {"url": d[6], "format": d[7], "tls": "none"} if d[6] else None,
                    "blank": d[8],
                }
            )
    states = _states(
        ctx,
        [(r[6], r[1]) for r in rows if r[2] not in ("creating", "converting")],
        one_by_one=limit is not None,
    )
    out = []
    for vm_id, name, phase, memory_mib, cpus, domain_type, host_id, last, created, host in rows:
        if phase in ("creating", "converting"):
            state = phase
        else:
            known = states[host_id]
            local = host_id in (None, LOCAL_HOST_ID)
            state = known.get(name, "missing" if known or local else "unknown")
        out.append(
            {
                "id": vm_id,
                "name": name,
                "state": state,
                "phase": phase,
                "memory_mib": memory_mib,
                "cpus": cpus,
                "domain_type": domain_type,
                "disks": disks.get(vm_id, []),
                "host": host or LOCAL_HOST,
                "last_start_seconds": last,
                "pause_reason": (
                    _pause_reason(ctx, vm_id, name, host_id) if state == "paused" else None
                ),
                "created_at": models.utc(created),
            }
        )
    return out


def _states(
    ctx: EngineContext, vms: list[tuple[str, str]], one_by_one: bool
) -> dict[str, dict[str, str]]:
    """The libvirt states of these (host id, name) VMs, by host and name; {} for
    a host libvirt does not answer for. `one_by_one`: for a page, looked up one
    VM at a time while there are few."""
    by_host: dict[str, list[str]] = {}
    for host_id, name in vms:
        by_host.setdefault(host_id, []).append(name)
    states: dict[str, dict[str, str]] = {}
    for host_id, names in by_host.items():
        host_virt = ctx.host_virt(host_id)
        try:
            if one_by_one and len(names) <= STATES_ONE_BY_ONE:
                states[host_id] = {name: host_virt.state(name) for name in names}
            else:
                states[host_id] = host_virt.states()
        except BackendError:
            states[host_id] = {}
    return states


def get(ctx: EngineContext, ref: str) -> models.Vm:
    with ctx.db.session() as s:
        return to_model(ctx, machines.find(s, ref))


def get_disk(ctx: EngineContext, ref: str) -> models.Disk:
    """A disk by its id or a unique prefix of it."""
    with ctx.db.session() as s:
        return disk_model(refs.find(s, Disk, ref, "disk"))


def console_path(ctx: EngineContext, ref: str) -> str:
    with ctx.db.session() as s:
        return machines.find(s, ref).console_log


def console(ctx: EngineContext, ref: str, offset: int) -> models.Console:
    """The guest's serial console from byte `offset` on (libvirt's virtlogd writes it)."""
    if offset < 0:
        raise InvalidInput("offset must be >= 0")
    with ctx.db.session() as s:
        path = machines.find(s, ref).console_log
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
    names = ", ".join(sorted(d.name for d in domains))
    raise InvalidInput(f"several storage domains exist ({names}): say which one with storage=NAME")


def probe_disk(ctx: EngineContext, req: models.ProbeRequest) -> models.ProbeResult:
    """Ask an external disk's server what it holds, creating nothing (the check
    `create` does, on its own: for a form that checks a URL as it is typed)."""
    storage.check_location(ctx, req.url)
    validate_format(req.format)
    spec = DiskSpec(url=req.url, format=req.format, check_readonly=req.check_readonly)
    p = probe(
        spec,
        ctx.settings.probe_timeout,
        lambda url: bridges.temporary(ctx, url),
        lambda path: storage.check_image_root(ctx, path, "file"),
    )
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
    """Check everything, then create the overlays (and blank volumes) and define
    the domain."""
    if req.ova:
        req = _from_ova(ctx, req)
    assert req.name is not None
    if req.convert:
        convert.check_available(ctx)
    # One spec per external disk, None for a blank one.
    specs = [
        DiskSpec(
            url=d.external_disk.url,
            format=d.external_disk.format,
            storage=d.storage_domain,
            check_readonly=d.check_readonly,
        )
        if d.external_disk
        else None
        for d in req.disks
    ]
    for spec in specs:  # cheap checks first
        if spec is None:
            continue
        storage.check_location(ctx, spec.url)
        validate_format(spec.format)
    with ctx.db.session() as s:
        if s.scalar(select(Vm).where(Vm.name == req.name)):
            raise Conflict(f"VM {req.name!r} exists already")
        domains = [_resolve_storage(s, d.storage_domain) for d in req.disks]
        _check_blank_fit(ctx, req.disks, domains)
        for sd in {sd.id: sd for sd in domains}.values():
            storage.check_space(ctx, sd)
        host = hosts.choose(ctx, s, domains, req.memory_mib, req.host)
        host_id = host.id
    host_virt = ctx.host_virt(host_id)
    if host_virt.lookup(req.name) is not None:
        raise Conflict(f"libvirt already has a domain named {req.name!r} (not thinair's)")
    probed: list[Probed | None] = [
        probe(
            spec,
            ctx.settings.probe_timeout,
            lambda url: bridges.temporary(ctx, url),
            lambda path: storage.check_image_root(ctx, path, "file"),
        )
        if spec
        else None
        for spec in specs
    ]

    # Hold the VM (against other engines' reconcilers too) before it is recorded.
    vm_id = new_id()
    with ctx.vm_busy(vm_id, "create"):
        created = _create(ctx, req, vm_id, host_id, domains, probed)
    if req.convert:  # a job of its own, once the create has let go of the VM
        convert.submit(ctx, vm_id)
    return created


def _create(
    ctx: EngineContext,
    req: models.VmCreate,
    vm_id: str,
    host_id: str,
    domains: list[StorageDomain],
    probed: list[Probed | None],
) -> models.Vm:
    # Record the intent, with every path we are about to create, before creating it.
    with ctx.db.session() as s:
        vm = Vm(
            id=vm_id,
            name=req.name,
            memory_mib=req.memory_mib,
            cpus=req.cpus,
            phase="creating",
            domain_type=ctx.domain_type_on(ctx.host_virt(host_id)),
            console_log="",
            host_id=host_id,
        )
        vm.console_log = str(ctx.settings.console_dir / f"{vm.id}.log")
        for index, (sd, d, p) in enumerate(zip(domains, req.disks, probed, strict=True)):
            if p is None:
                assert d.blank is not None
                size = d.blank.virtual_size
            else:
                size = p.virtual_size
            disk = Disk(
                id=new_id(),
                position=index,
                target=virt.disk_target(index),
                storage_domain_id=sd.id,
                volume_format="qcow2",
                virtual_size=size,
                external_url=p.url if p else None,
                external_format=p.format if p else None,
                external_read_only=p.read_only if p else None,
                blank=p is None,
                volume_path="",
            )
            disk.volume_path = str(Path(sd.path) / f"{disk.id}.qcow2")
            vm.disks.append(disk)
        s.add(vm)
    try:
        _materialize(ctx, vm_id)
        with ctx.db.session() as s:
            vm = machines.find(s, vm_id)
            # A VM to convert is not ready before virt-v2v has run over its overlays.
            vm.phase = "converting" if req.convert else "ready"
            created = to_model(ctx, vm)
        ctx.events.vm_changed(created.id, created.name)
        return created
    except BaseException:
        log.exception("creating VM %s failed; undoing", req.name)
        machines.destroy(ctx, vm_id)  # whatever it got to: domain (if ours), volumes, record
        raise


def _check_blank_fit(
    ctx: EngineContext, disks: list[models.DiskCreate], domains: list[StorageDomain]
) -> None:
    """Refuse blank disks whose full size does not fit in their domain's free space
    (a guest that fills a disk with no room behind it gets paused by QEMU)."""
    wanted: dict[str, int] = {}
    for d, sd in zip(disks, domains, strict=True):
        if d.blank is not None:
            wanted[sd.id] = wanted.get(sd.id, 0) + d.blank.virtual_size
    for sd in domains:
        if sd.id not in wanted:
            continue
        need = wanted.pop(sd.id)
        try:
            free = shutil.disk_usage(sd.path).free - ctx.settings.min_free_mib * 2**20
        except OSError:
            continue  # check_space says why
        if need > free:
            raise InvalidInput(
                f"blank disks of {_gib(need)} do not fit on storage domain {sd.name!r}: "
                f"{_gib(max(free, 0))} free (less the {ctx.settings.min_free_mib} MiB kept free)"
            )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _materialize(ctx: EngineContext, vm_id: str) -> None:
    with ctx.db.session() as s:
        vm = machines.find(s, vm_id)
        for disk in vm.disks:
            if disk.blank:
                try:
                    qemu_img.create(disk.volume_path, "qcow2", disk.virtual_size)
                except CommandFailed as e:
                    raise StorageError(f"cannot create {disk.volume_path}: {e.stderr}") from e
                continue
            machines.create_overlay(ctx, disk)
        crash_point("create-overlays")
        machines.virt_of(ctx, vm).define(virt.domain_xml(machines.domain_spec(ctx, vm)))
    crash_point("create-defined")


# -- start / stop ------------------------------------------------------------


def _ready(s: Session, ref: str) -> Vm:
    vm = machines.find(s, ref)
    if vm.phase != "ready":
        raise Conflict(f"VM {vm.name!r} is {vm.phase}")
    return vm


def start(ctx: EngineContext, ref: str, host: str | None = None) -> models.Vm:
    with ctx.db.session() as s:
        vm = _ready(s, ref)
        vm_id, name = vm.id, vm.name
        for d in vm.disks:
            half_done = import_state.load(ctx, d.id)
            if half_done and half_done.phase in import_state.COMMITTED and d.external_url:
                raise Conflict(
                    f"{name}: the import of {d.target} stopped half way through its "
                    "switch to the local copy: run `vm import` again to finish it"
                )
    with ctx.vm_busy(vm_id, "start"):
        if host is not None:
            _move(ctx, vm_id, host)
        with ctx.db.session() as s:
            host_virt = machines.virt_of(ctx, machines.find(s, vm_id))
        state = host_virt.state(name)
        if state == "running":
            raise Conflict(f"VM {name!r} is running already")
        if state == "paused":
            # QEMU pauses a guest whose write met a full disk: go on once there is space.
            host_virt.resume(name)
            return get(ctx, vm_id)
        if state == "missing":
            raise BackendError(
                f"libvirt lost the domain of {name!r}; restart the engine to have it defined again"
            )
        machines.ensure_bridges(ctx, vm_id)
        crash_point("start-bridges")
        began = time.monotonic()
        host_virt.start(name)
        took = time.monotonic() - began
        with ctx.db.session() as s:
            vm = machines.find(s, vm_id)
            vm.last_start_seconds = round(took, 3)
            started = to_model(ctx, vm)
        ctx.events.vm_changed(vm_id, name)
        return started


def _move(ctx: EngineContext, vm_id: str, host_ref: str) -> None:
    """Define a stopped VM on another host (that reaches its storage and has the
    memory), and undefine it where it was."""
    with ctx.db.session() as s:
        vm = machines.find(s, vm_id)
        target = hosts.choose(ctx, s, [d.storage_domain for d in vm.disks], vm.memory_mib, host_ref)
        if target.id == vm.host_id:
            return
        local = machines.is_local(vm)
        if any(bridges.bridged(d.external_url) for d in vm.disks) and (
            local or target.id == LOCAL_HOST_ID
        ):
            raise Conflict(
                f"{vm.name} reads its external NBD disks "
                f"{'through this machine' if local else 'directly'}: it cannot move to "
                f"{target.name} before it is imported"
            )
        old = machines.virt_of(ctx, vm)
        name = vm.name
        if old.state(name) not in ("stopped", "missing"):
            raise Conflict(f"VM {name!r} is running on {vm.host.name}: stop it first to move it")
        new = ctx.host_virt(target.id)
        if new.lookup(name) is not None:
            raise Conflict(f"host {target.name} already has a domain named {name!r}")
        vm.host_id = target.id
        vm.domain_type = ctx.domain_type_on(new)
        s.flush()
        new.define(virt.domain_xml(machines.domain_spec(ctx, vm)))
    dom = old.lookup(name)
    if dom is not None and old.owner(dom) == (ctx.engine_id, vm_id):
        old.undefine(name)


def stop(ctx: EngineContext, ref: str, req: models.VmStop) -> models.Vm:
    with ctx.db.session() as s:
        vm = _ready(s, ref)
        vm_id, name = vm.id, vm.name
        host_virt = machines.virt_of(ctx, vm)
    with ctx.vm_busy(vm_id, "stop"):
        if host_virt.state(name) not in ("stopped", "missing"):
            host_virt.stop(name, force=req.force, timeout=req.timeout or ctx.settings.stop_timeout)
    return get(ctx, vm_id)


# -- remove / rollback -------------------------------------------------------


def remove(ctx: EngineContext, ref: str, force: bool = False) -> None:
    """Remove a VM and every volume thinair made for it (temporary or imported)."""
    with ctx.db.session() as s:
        vm = machines.find(s, ref)
        vm_id, name = vm.id, vm.name
        host_virt = machines.virt_of(ctx, vm)
    if not force and host_virt.state(name) not in ("stopped", "missing"):
        raise Conflict(f"VM {name!r} is running: stop it first, or remove it with --force")
    _cancel_jobs(ctx, vm_id)
    with ctx.vm_busy(vm_id, "remove"):
        machines.destroy(ctx, vm_id)


def rollback(ctx: EngineContext, ref: str) -> None:
    """Stop the VM and discard its temporary disks and the blank disks made with
    it; the external disks were never written, so nothing else changes."""
    with ctx.db.session() as s:
        vm = machines.find(s, ref)
        vm_id, name = vm.id, vm.name
        imported = [d.target for d in vm.disks if not d.external_url and not d.blank]
    if imported:
        raise Conflict(
            f"{name}: disk {', '.join(imported)} is local already (imported); there is "
            "nothing to roll back to: use `vm remove` to delete the VM"
        )
    _cancel_jobs(ctx, vm_id)
    with ctx.vm_busy(vm_id, "rollback"):
        machines.destroy(ctx, vm_id)


def _cancel_jobs(ctx: EngineContext, vm_id: str) -> None:
    """An import in progress is cancelled (the VM goes back to its temporary
    disks) before the VM is rolled back or removed."""
    ctx.jobs.cancel_and_wait(vm_id)
