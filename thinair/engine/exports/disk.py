"""An export of a running VM's disk: freeze the disk's volume behind a new
overlay (the guest writes there meanwhile), and merge the overlay back when the
export goes."""

from __future__ import annotations

import contextlib
import logging
import os
import xml.etree.ElementTree as ET
from contextlib import ExitStack

from thinair import models
from thinair.adapters import snapshot
from thinair.db.models import Export, Vm
from thinair.engine import machines, storage
from thinair.engine.context import EngineContext
from thinair.errors import Conflict, NotFound
from thinair.states import DOMAIN_LIVE, DomainState, VmPhase, require_phase

log = logging.getLogger("thinair.engine.exports")


def vm_disk(
    ctx: EngineContext, req: models.ExportCreate, hold: ExitStack
) -> tuple[str, str, str, int]:
    """The running VM's disk to freeze: (vm id, volume path, format, size); the VM
    is held busy in `hold` from here on."""
    assert req.vm is not None
    target = req.disk or "vda"
    with ctx.db.session() as s:
        vm = machines.find(s, req.vm)
        disk = next((d for d in vm.disks if d.target == target), None)
        if disk is None:
            raise NotFound(f"VM {vm.name!r} has no disk {target!r}")
        vm_id, name = vm.id, vm.name
        volume, fmt, size = disk.volume_path, disk.volume_format, disk.virtual_size
        # The guest's writes go to a new overlay beside the volume meanwhile.
        storage.check_space(ctx, disk.storage_domain)
        require_phase(vm, VmPhase.READY)
    hold.enter_context(ctx.vm_busy(vm_id, f"an export of its disk {target}"))
    if ctx.vm_virt(name).state(name) not in DOMAIN_LIVE:
        raise Conflict(
            f"VM {name!r} is not running: nothing writes to {target}, expose its volume "
            f"{volume} itself"
        )
    if ctx.vm_virt(name).disk_chain(name, target)[0] != volume:
        raise Conflict(f"VM {name!r} {target} is not on its volume {volume} now")
    return vm_id, volume, fmt, size


def freeze(ctx: EngineContext, e: Export) -> None:
    assert e.vm_id is not None and e.disk is not None and e.snapshot_path is not None
    with ctx.db.session() as s:
        vm = s.get(Vm, e.vm_id)
        assert vm is not None
        name = vm.name
    snapshot.freeze(ctx.vm_virt(name), name, e.disk, e.snapshot_path)
    log.info(
        "froze %s %s at %s; the guest writes to %s now", name, e.disk, e.image, e.snapshot_path
    )


def merge_back(ctx: EngineContext, e: Export) -> None:
    """Put a VM whose disk was frozen for this export back on its own volume:
    commit the overlay the guest wrote to since into it, then delete the overlay.
    Idempotent: does only what the domain's chain shows is still to do."""
    if not (e.vm_id and e.disk and e.snapshot_path):
        return
    with ctx.db.session() as s:
        vm = s.get(Vm, e.vm_id)
        name = vm.name if vm is not None else None
    if name is not None and ctx.vm_virt(name).state(name) != DomainState.MISSING:
        chain = ctx.vm_virt(name).disk_chain(name, e.disk)
        if chain and chain[0] == e.snapshot_path:
            if ctx.vm_virt(name).state(name) in DOMAIN_LIVE:
                snapshot.merge_back(ctx.vm_virt(name), name, e.disk, e.image)
            else:
                snapshot.merge_back_offline(e.snapshot_path)
        if _configured_top(ctx, name, e.disk) != e.image:
            # The definition for the next boot still names the overlay.
            assert e.vm_id is not None
            machines.redefine(ctx, e.vm_id)
        log.info("merged %s %s back into %s", name, e.disk, e.image)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(e.snapshot_path)


def _configured_top(ctx: EngineContext, name: str, target: str) -> str | None:
    root_el = ET.fromstring(ctx.vm_virt(name).xml(name, inactive=True))
    for disk in root_el.iterfind("devices/disk"):
        tgt, src = disk.find("target"), disk.find("source")
        if tgt is not None and tgt.get("dev") == target and src is not None:
            return src.get("file")
    return None
