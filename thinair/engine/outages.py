"""Outages: a VM paused because its source stopped answering, resumed when it
answers again.

Disks with an external source run with libvirt's error_policy='stop' and
rerror_policy='stop' (see thinair.adapters.virt.DiskDevice): once a bridge's
retry window is over (or QEMU's own HTTP/SSH client gives up), the failed
request pauses the VM instead of giving the guest EIO, and QEMU keeps it to
issue again on resume. Like oVirt, the engine then asks the source every
`resume_check_interval` seconds whether it answers, and resumes the VM when it
does; the guest only sees time pass, however long the outage. Meanwhile
`vm show`, the API (`pause_reason`), the events stream and the UI say why it is
paused. A VM paused for another reason (by a user, a full storage domain) is
left alone: only the reason is told.

The probe runs without holding the VM, so a `vm rollback` or `vm stop --force`
of a paused VM is never refused because of it; the resume itself holds the VM,
and skips a round when a flow has it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from thinair.db.models import Disk, Vm
from thinair.engine import bridges
from thinair.engine.context import EngineContext
from thinair.engine.probe import probe
from thinair.errors import BackendError, ThinairError
from thinair.external import DiskSpec
from thinair.states import DomainState, VmPhase

log = logging.getLogger(__name__)


# (target, external URL or None, external format or None)
_DiskRef = tuple[str, str | None, str | None]


@dataclass(frozen=True)
class _Paused:
    reason: str
    since: float  # time.time() of the first round that saw it paused


def source_problem(ctx: EngineContext, url: str, fmt: str | None, timeout: float) -> str | None:
    """Why the external disk at `url` cannot be read now, or None when it answers:
    the same check `vm create` makes (an NBD handshake, then qemu-img reading
    the image's header), with a short timeout."""
    spec = DiskSpec(url=url, format=fmt, check_readonly=False)
    try:
        probe(spec, timeout, lambda u: bridges.temporary(ctx, u))
    except ThinairError as e:
        return e.message
    return None


class OutageWatcher:
    """A thread of the engine: finds the VMs QEMU paused on an I/O error, says
    why, and resumes those whose sources all answer again."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.interval = ctx.settings.resume_check_interval
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._paused: dict[str, _Paused] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="outages", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def wake(self) -> None:
        """A domain was paused: look now rather than at the next round (from any
        thread, libvirt's event thread included)."""
        self._wake.set()

    def reason(self, vm_id: str) -> str | None:
        with self._lock:
            paused = self._paused.get(vm_id)
        return paused.reason if paused else None

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self.check()
            except Exception:  # libvirt or the database restarting: next round
                log.exception("looking for VMs paused on an I/O error failed")

    def check(self) -> list[str]:
        """One round; returns what it did, one line per VM, for the log and tests."""
        with self.ctx.db.session() as s:
            vms = list(
                s.scalars(
                    select(Vm)
                    .where(Vm.phase == VmPhase.READY)
                    .options(selectinload(Vm.disks).selectinload(Disk.storage_domain))
                )
            )
            by_host: dict[str | None, list[tuple[str, str, list[_DiskRef]]]] = {}
            for vm in vms:
                disks = [(d.target, d.external_url, d.external_format) for d in vm.disks]
                by_host.setdefault(vm.host_id, []).append((vm.id, vm.name, disks))
        actions: list[str] = []
        seen: set[str] = set()
        for host_id, host_vms in by_host.items():
            host_virt = self.ctx.host_virt(host_id)
            try:
                paused = host_virt.paused_on_io_error()
            except BackendError:
                continue
            for vm_id, name, disks in host_vms:
                if name not in paused:
                    continue
                seen.add(vm_id)
                action = self._handle(host_id, vm_id, name, disks)
                if action:
                    actions.append(action)
        with self._lock:
            for vm_id in set(self._paused) - seen:
                del self._paused[vm_id]
        for line in actions:
            log.info("outages: %s", line)
        return actions

    def _handle(
        self,
        host_id: str | None,
        vm_id: str,
        name: str,
        disks: list[_DiskRef],
    ) -> str | None:
        host_virt = self.ctx.host_virt(host_id)
        try:
            errors = host_virt.disk_errors(name)
        except BackendError:
            return None
        full = [t for t, kind in errors.items() if kind == "no space"]
        if full:
            return self._note(
                vm_id,
                name,
                f"paused: no space left for disk {', '.join(full)} on its storage domain; "
                "free some, then `vm start` resumes it",
            )
        # The disks whose I/O failed, or all external ones if QEMU named none.
        external = [(t, url, fmt) for t, url, fmt in disks if url]
        failed = [d for d in external if d[0] in errors] or external
        if not failed:
            targets = ", ".join(errors) or "a disk"
            return self._note(vm_id, name, f"paused: I/O error on {targets} (a local volume)")
        timeout = min(self.ctx.settings.probe_timeout, max(self.interval, 2.0))
        for target, url, fmt in failed:
            assert url is not None
            problem = source_problem(self.ctx, url, fmt, timeout)
            if problem is not None:
                return self._note(
                    vm_id,
                    name,
                    f"paused: the source {url} of disk {target} does not answer ({problem}); "
                    "it resumes when the source answers again",
                )
        with self.ctx.vm_if_free(vm_id) as free:
            if not free:  # a rollback, stop or import holds it: not now
                return None
            if host_virt.pause_reason(name) != "I/O error":
                return None
            try:
                host_virt.resume(name)
            except BackendError as e:
                return self._note(vm_id, name, f"paused: the source answers, but {e.message}")
        with self._lock:
            was = self._paused.pop(vm_id, None)
        took = f" after {time.time() - was.since:.0f} s" if was else ""
        reason = f"resumed{took}: its sources answer again"
        self.ctx.events.vm_changed(vm_id, name, DomainState.RUNNING, reason=reason)
        return f"resumed {name}{took}: its sources answer again"

    def _note(self, vm_id: str, name: str, reason: str) -> str | None:
        with self._lock:
            old = self._paused.get(vm_id)
            self._paused[vm_id] = _Paused(reason, old.since if old else time.time())
        if old is not None and old.reason == reason:
            return None
        self.ctx.events.vm_changed(vm_id, name, DomainState.PAUSED, reason=reason)
        return f"{name} {reason}"
