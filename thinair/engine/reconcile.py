"""On start, make what libvirt and the storage hold agree with the database.

- a VM left in phase creating (the engine died while creating it) is undone;
- a VM left in phase removing is removed to the end;
- a VM left converting with no conversion job is undone (one with a job is
  converted again by the job);
- a ready VM whose domain libvirt lost is defined again from its record;
- a domain this engine defined that has no record is undefined (its volumes went
  with the record, so it could not run anyway).
Only domains carrying this installation's id are touched, and only VMs no flow
holds (another engine on the same database may be creating or removing one).
Exports are reconciled too (see engine/exports/reconcile.py): live servers
adopted, dead ones started again, servers without a record stopped.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from thinair.db.models import LOCAL_HOST_ID, Disk, Host, Vm
from thinair.engine import bridges, convert, exports, hosts, import_state, machines
from thinair.engine.context import EngineContext
from thinair.errors import BackendError

log = logging.getLogger(__name__)


def reconcile(ctx: EngineContext) -> list[str]:
    """Returns what it did, one line per action, for the log and the tests."""
    actions: list[str] = []
    with ctx.db.session() as s:
        records = {vm.id: (vm.name, vm.phase) for vm in s.scalars(select(Vm))}
    unconverted = set(convert.orphans(ctx))
    for vm_id, (name, phase) in records.items():
        with ctx.vm_if_free(vm_id) as free:
            if not free:
                continue
            with ctx.db.session() as s:  # as it is now that we hold it
                vm = s.get(Vm, vm_id)
                phase = vm.phase if vm is not None else "gone"
            if vm_id in unconverted:
                machines.destroy(ctx, vm_id)
                actions.append(f"undid create of {name} (its conversion never began)")
            elif phase in ("creating", "removing"):
                machines.destroy(ctx, vm_id)
                actions.append(f"{'undid create of' if phase == 'creating' else 'removed'} {name}")
            elif phase == "ready":
                try:
                    lost = ctx.vm_virt(name).lookup(name) is None
                except BackendError as e:  # its host is down: its turn comes later
                    actions.append(f"could not check {name}: {e.message}")
                    continue
                if lost:
                    machines.redefine(ctx, vm_id)
                    actions.append(f"defined {name} again")
    with ctx.db.session() as s:
        uris = [hosts.uri(ctx, h) for h in s.scalars(select(Host))]
    for uri in uris:
        host_virt = ctx.virt_at(uri)
        try:
            owned = host_virt.owned_domains(ctx.engine_id)
        except BackendError:  # that host is down: its orphans wait for the next start
            continue
        for vm_id, name in owned.items():
            if vm_id not in records:
                host_virt.undefine(name)
                actions.append(f"undefined orphan domain {name}")
    # Every external NBD disk of a VM still here is read through its bridge: the
    # bridges outlive an engine, but not a reboot or a kill.
    with ctx.db.session() as s:
        wanted = {
            d.id: (d.external_url, d.external_format)
            for d in s.scalars(
                select(Disk)
                .join(Vm)
                .where(Vm.phase.in_(("ready", "converting")), Vm.host_id == LOCAL_HOST_ID)
            )
            if d.external_url and bridges.bridged(d.external_url, d.external_format)
        }
    actions += bridges.reconcile(ctx, wanted)
    # An import record whose disk is gone (its VM removed by an engine that died
    # before it got there) owns a partial copy that nothing will resume.
    with ctx.db.session() as s:
        disks = set(s.scalars(select(Disk.id)))
    for disk_id in import_state.known(ctx):
        if disk_id not in disks:
            import_state.discard(ctx, disk_id)
            actions.append(f"deleted the partial import of removed disk {disk_id}")
    actions += exports.reconcile(ctx)
    for line in actions:
        log.info("reconcile: %s", line)
    return actions
