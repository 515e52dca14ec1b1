"""An export of a running VM's disk: freeze the disk's volume behind a new
overlay (the guest writes there meanwhile), and merge the overlay back when the
export goes."""

from __future__ import annotations

import contextlib
import logging
import os
from contextlib import ExitStack

from thinair import models
from thinair.adapters import snapshot
from thinair.db.models import Export, Vm
from thinair.engine import machines, storage
from thinair.engine.context import EngineContext
from thinair.errors import Conflict, NotFound

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
        vm_id, name, phase = vm.id, vm.name, vm.phase
        host_virt = machines.virt_of(ctx, vm)
        volume, fmt, size = disk.volume_path, disk.volume_format, disk.virtual_size
        # The guest's writes go to a new overlay beside the volume meanwhile.
        storage.check_space(ctx, disk.storage_domain)
    if phase != "ready":
        raise Conflict(f"VM {name!r} is {phase}")
    hold.enter_context(ctx.vm_busy(vm_id, f"an export of its disk {target}"))
    if host_virt.state(name) not in ("running", "paused"):
        raise Conflict(
            f"VM {name!r} is not running: nothing writes to {target}, expose its volume "
            f"{volume} itself"
        )
    if host_virt.disk(name, target).top != volume:
        raise Conflict(f"VM {name!r} {target} is not on its volume {volume} now")
    return vm_id, volume, fmt, size


def freeze(ctx: EngineContext, e: Export) -> None:
    assert e.vm_id is not None and e.disk is not None and e.snapshot_path is not None
    with ctx.db.session() as s:
        vm = s.get(Vm, e.vm_id)
        assert vm is not None
        name, host_virt = vm.name, machines.virt_of(ctx, vm)
    snapshot.freeze(host_virt, name, e.disk, e.snapshot_path)
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
        if vm is None:
            name, host_virt = None, None
        else:
            name, host_virt = vm.name, machines.virt_of(ctx, vm)
    if name is not None and host_virt is not None and host_virt.state(name) != "missing":
        if host_virt.disk(name, e.disk).top == e.snapshot_path:
            if host_virt.state(name) in ("running", "paused"):
                snapshot.merge_back(host_virt, name, e.disk, e.image)
            else:
                snapshot.merge_back_offline(e.snapshot_path)
        defined = {d.target: d.top for d in host_virt.disks(name, inactive=True)}
        if defined.get(e.disk) != e.image:
            # The definition for the next boot still names the overlay.
            assert e.vm_id is not None
            machines.redefine(ctx, e.vm_id)
        log.info("merged %s %s back into %s", name, e.disk, e.image)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(e.snapshot_path)
