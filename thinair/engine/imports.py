"""Import: make a VM's external disks local, running or stopped.

Strategies, per disk:
- stream: pull the backing data into the temporary disk (libvirt block pull; for
  a stopped VM `qemu-img rebase -b ""`), then drop the backing: the temporary
  disk becomes the final one. Needs the temporary disk on the target domain. A
  crash loses nothing: the qcow2 overlay records what is local already.
- mirror: copy the whole chain to a new volume on the target domain (libvirt
  block copy with synchronous writes once ready; for a stopped VM `qemu-img
  convert`), pivot to it when libvirt says the mirror is ready, then delete the
  temporary disk, as oVirt's live storage migration does.

Every step is idempotent and reads what libvirt holds before acting, so an
engine that dies mid-import resumes the job from where the disk is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from thinair import models
from thinair.adapters import nbd_client, qemu_img, virt
from thinair.adapters._process import CommandFailed
from thinair.db.models import Disk, StorageDomain, Vm, new_id
from thinair.engine import bridges, exports, storage, vms
from thinair.engine.context import EngineContext
from thinair.engine.faults import crash_point
from thinair.engine.jobs import JobCancelled, JobHandle, JobRunner
from thinair.errors import BackendError, Conflict, InvalidInput, StorageError
from thinair.external import parse_url

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.5
# Seconds an import waits for a restarting libvirtd before it gives up.
LIBVIRT_RESTART_WAIT = 120.0


# -- starting ------------------------------------------------------------------


def start(
    ctx: EngineContext,
    runner: JobRunner,
    ref: str,
    req: models.ImportRequest,
    only_disk: str | None = None,
) -> models.Job:
    """Check everything, then submit the job. `only_disk` (an id or target) moves
    one disk, as `disk move` does."""
    with ctx.db.session() as s:
        vm = vms.find(s, ref)
        if vm.phase != "ready":
            raise Conflict(f"VM {vm.name!r} is {vm.phase}")
        target_sd = storage.find(s, req.to)
        disks = [d for d in vm.disks if only_disk in (None, d.id, d.target)]
        if only_disk is not None and not disks:
            raise InvalidInput(f"VM {vm.name!r} has no disk {only_disk!r}")
        external = [d for d in disks if d.external_url]
        if not external:
            raise Conflict(
                f"VM {vm.name!r} has no external disk to import: "
                f"{', '.join(d.target for d in disks)} local already"
            )
        plan: dict[str, str] = {}
        for d in external:
            plan[d.id] = _strategy(d, target_sd, req.strategy)
        storage.check_space(ctx, target_sd, sum(_needed_bytes(d) for d in external))
        params: dict[str, Any] = {
            "to": target_sd.id,
            "bandwidth": int(req.bandwidth_mib * 2**20) if req.bandwidth_mib else None,
            "strategies": plan,
            "disks": [d.id for d in external],
            "dest": {},
            "old": {},
        }
        vm_id = vm.id
    return runner.submit("import", vm_id, params)


def _strategy(disk: Disk, target_sd: StorageDomain, asked: str | None) -> str:
    on_target = disk.storage_domain_id == target_sd.id
    if asked == "stream" and not on_target:
        raise InvalidInput(
            f"stream keeps the temporary disk as the final one, so it must already be on "
            f"{target_sd.name!r}, but {disk.target}'s is on {disk.storage_domain.name!r}: "
            "use --strategy mirror"
        )
    if asked:
        return asked
    return "stream" if on_target else "mirror"


def _needed_bytes(disk: Disk) -> int:
    """What the copy will allocate: qemu-img measure over the whole chain (it reads
    the source's allocation map, so a sparse 1 TiB source measures small)."""
    try:
        return qemu_img.measure(disk.volume_path, "qcow2")
    except CommandFailed as e:
        raise BackendError(f"cannot measure {disk.target}: {e.stderr}") from None


# -- running -------------------------------------------------------------------


def run(ctx: EngineContext, job: JobHandle) -> None:
    assert job.vm_id is not None
    with ctx.vm_busy(job.vm_id, "import"):
        with ctx.db.session() as s:
            vm = s.get(Vm, job.vm_id)
            if vm is None:
                raise Conflict("the VM was removed")
            name = vm.name
        progress = _Progress(job)
        sources: set[str] = set()  # what the disks read from before the import
        with ctx.db.session() as s:
            for disk_id in job.params["disks"]:
                disk = s.get(Disk, disk_id)
                if disk is None:
                    raise Conflict("the disk was removed")
                progress.add(disk.target, disk.virtual_size, disk.external_url is None)
                if disk.external_url:
                    sources.add(disk.external_url)
        vms.ensure_bridges(ctx, job.vm_id)  # the copy reads through them
        for disk_id in job.params["disks"]:
            job.check_cancel()
            _import_disk(ctx, job, name, disk_id, progress)
        exports.release(ctx, sources)  # one of thinair's own exports, if nothing else reads it
        job.update(step="done", progress=progress.snapshot(final=True))


def _import_disk(
    ctx: EngineContext, job: JobHandle, name: str, disk_id: str, progress: _Progress
) -> None:
    with ctx.db.session() as s:
        disk = s.get(Disk, disk_id)
        assert disk is not None
        target, overlay, source = disk.target, disk.volume_path, disk.external_url
        if source is None:
            _cleanup_old(job, disk_id)
            return
        sd = s.get(StorageDomain, job.params["to"])
        assert sd is not None
        sd_path = sd.path
    try:
        _copy_disk(ctx, job, name, disk_id, target, overlay, sd_path, progress)
    except BackendError as e:
        try:
            running = ctx.vm_virt(name).state(name) in ("running", "paused")
        except BackendError:
            running = False
        if running and (problem := _source_problem(ctx, source)):
            raise BackendError(
                f"the source of {target} is gone ({problem}); the VM runs on what it has, "
                "and `import` run again resumes once the source is back"
            ) from e
        if full := _storage_problem(ctx, job.params["to"]):
            kept = (
                "what was copied stays in the temporary disk"
                if job.params["strategies"][disk_id] == "stream"
                else "the partial copy is deleted and the VM runs on its temporary disk"
            )
            raise StorageError(
                f"{full}: the copy of {target} stopped; {kept}. Free some space and run "
                "the import again"
            ) from e
        raise
    _cleanup_old(job, disk_id)


def _storage_problem(ctx: EngineContext, sd_id: str) -> str | None:
    with ctx.db.session() as s:
        sd = s.get(StorageDomain, sd_id)
        if sd is None:
            return None
        try:
            storage.check_space(ctx, sd)
        except StorageError as e:
            return e.message
    return None


def _source_problem(ctx: EngineContext, url: str) -> str | None:
    """Why the source cannot be read now, or None if it answers."""
    ext = parse_url(url)
    try:
        if ext.is_nbd:
            nbd_client.probe(url, ctx.settings.probe_timeout)
        elif ext.scheme in ("http", "https", "ftp", "ftps", "ssh"):
            qemu_img.info(url, timeout=ctx.settings.probe_timeout)
        # (a local file, or a tar member read through its bridge: not a server to ask)
    except nbd_client.NBDProbeError as e:
        return f"{url}: {e}"
    except CommandFailed as e:
        return f"{url}: {e.stderr.strip().splitlines()[-1] if e.stderr.strip() else e}"
    return None


def _copy_disk(
    ctx: EngineContext,
    job: JobHandle,
    name: str,
    disk_id: str,
    target: str,
    overlay: str,
    sd_path: str,
    progress: _Progress,
) -> None:
    strategy = job.params["strategies"][disk_id]
    running = ctx.vm_virt(name).state(name) in ("running", "paused")
    if strategy == "mirror":
        dest = job.params["dest"].get(disk_id)
        if dest is None:  # plan the path before creating anything
            dest = str(Path(sd_path) / f"{new_id()}.qcow2")
            job.update(params={**job.params, "dest": {**job.params["dest"], disk_id: dest}})
        if running:
            _live_mirror(ctx, job, name, target, overlay, dest, progress)
        else:
            _offline_mirror(job, target, overlay, dest, progress)
        _commit(ctx, job, disk_id, new_path=dest)
    else:
        if running:
            _live_stream(ctx, job, name, target, progress)
        else:
            _offline_stream(job, target, overlay, progress)
        _commit(ctx, job, disk_id, new_path=overlay)
    crash_point("import-committed")


def _wait_job(
    ctx: EngineContext,
    job: JobHandle,
    name: str,
    target: str,
    progress: _Progress,
    until: tuple[str, ...],
    tick: Callable[[], None] | None = None,
) -> str:
    """Follow libvirt's block job on the disk until one of the `until` events,
    updating progress and calling `tick` between checks; raise on failure or
    cancellation."""
    # With a tick (a flush of the destination), check more often: each flush
    # then has little to write.
    interval = PROGRESS_INTERVAL if tick is None else 0.1
    while True:
        event = ctx.vm_virt(name).wait_block_event(name, target, interval)
        if tick is not None:
            tick()
        try:
            info = _block_job_info(ctx, name, target)
        except BackendError:
            if ctx.vm_virt(name).state(name) not in ("running", "paused"):
                raise BackendError(
                    f"the VM stopped while {target} was being copied; start it and run "
                    "the import again: it resumes from the temporary disk"
                ) from None
            raise
        if info is not None:
            progress.set(target, *info)
        if event in until:
            return event
        if event in (virt.JOB_FAILED, virt.JOB_CANCELED):
            raise BackendError(
                f"copying {target} {event}: see the engine's log and "
                "libvirt's for the reason (is the source still reachable?)"
            )
        if info is None and event is None:
            if ctx.vm_virt(name).state(name) not in ("running", "paused"):
                raise BackendError(f"the VM stopped while {target} was being copied")
            return ""  # the job ended with no event we saw (e.g. before a restart)
        if job.cancel_requested:
            raise JobCancelled()


def _block_job_info(ctx: EngineContext, name: str, target: str) -> tuple[int, int] | None:
    """The block job's progress, riding out a libvirtd restart: the copy goes on
    in QEMU meanwhile, and libvirtd picks the job up again when it starts."""
    virt_ = ctx.vm_virt(name)
    try:
        return virt_.block_job(name, target)
    except BackendError:
        virt_.wait_connected(LIBVIRT_RESTART_WAIT)
        return virt_.block_job(name, target)


def _live_mirror(
    ctx: EngineContext,
    job: JobHandle,
    name: str,
    target: str,
    overlay: str,
    dest: str,
    progress: _Progress,
) -> None:
    chain = ctx.vm_virt(name).disk_chain(name, target)
    if chain[0] == dest:
        return  # pivoted already (the engine died before recording it)
    try:
        if ctx.vm_virt(name).block_job(name, target) is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dest)  # a partial copy from before a restart
            job.update(step=f"copy {target}")
            # QEMU's mirror keeps at most 16 x 1 MiB reads in flight on one
            # connection, whatever the buffer size: buf-size and granularity
            # changed nothing when measured, so libvirt's defaults stay.
            ctx.vm_virt(name).block_copy(
                name,
                target,
                dest,
                "qcow2",
                bandwidth=job.params["bandwidth"],
                shallow=False,
                reuse_external=False,
            )
        if not ctx.vm_virt(name).mirror_ready(name, target):
            with _flushing(dest) as flush:
                event = _wait_job(ctx, job, name, target, progress, (virt.JOB_READY,), flush)
            if event != virt.JOB_READY and not ctx.vm_virt(name).mirror_ready(name, target):
                raise BackendError(f"the copy of {target} ended before it was ready")
        job.check_cancel()
        job.update(step=f"pivot {target}")
        ctx.vm_virt(name).block_job_abort(name, target, pivot=True)
        deadline = time.monotonic() + 60
        while ctx.vm_virt(name).disk_chain(name, target)[0] != dest:
            if time.monotonic() > deadline:
                raise BackendError(f"libvirt did not switch {target} to {dest}")
            ctx.vm_virt(name).wait_block_event(name, target, 0.2)
        crash_point("import-pivoted")
    except BaseException:
        _abandon_mirror(ctx, name, target, dest)
        raise
    _verify_local(ctx, name, target)


@contextlib.contextmanager
def _flushing(path: str) -> Iterator[Callable[[], None]]:
    """A flush of the mirror's destination, to call while the copy runs.

    QEMU flushes the whole copy to disk just before the mirror is ready, and with
    synchronous writes the guest's writes wait behind that flush: measured, a
    guest writing flat out stalled for 400-500 ms there. Flushing the file as the
    copy goes (fsync on any descriptor flushes its pages) leaves that last flush
    little to do (measured: 45 ms)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # libvirt creates it; nothing to flush yet
        yield lambda: None
        return
    try:
        yield lambda: os.fsync(fd)
    finally:
        os.close(fd)


def _abandon_mirror(ctx: EngineContext, name: str, target: str, dest: str) -> None:
    """Cancel a copy that did not pivot: the VM keeps running on its temporary disk."""
    try:
        if (
            ctx.vm_virt(name).state(name) == "running"
            and ctx.vm_virt(name).disk_chain(name, target)[0] == dest
        ):
            return  # it did pivot: keep the destination
        if (
            ctx.vm_virt(name).state(name) == "running"
            and ctx.vm_virt(name).block_job(name, target) is not None
        ):
            ctx.vm_virt(name).block_job_abort(name, target, pivot=False)
            deadline = time.monotonic() + 30
            while (
                ctx.vm_virt(name).block_job(name, target) is not None
                and time.monotonic() < deadline
            ):
                time.sleep(0.1)
    except BackendError:
        log.exception("could not cancel the copy of %s %s", name, target)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dest)


def _live_stream(
    ctx: EngineContext, job: JobHandle, name: str, target: str, progress: _Progress
) -> None:
    if len(ctx.vm_virt(name).disk_chain(name, target)) > 1:
        try:
            if ctx.vm_virt(name).block_job(name, target) is None:
                job.update(step=f"pull {target}")
                ctx.vm_virt(name).block_pull(name, target, bandwidth=job.params["bandwidth"])
            _wait_job(ctx, job, name, target, progress, (virt.JOB_COMPLETED,))
        except JobCancelled:
            # What was pulled stays in the overlay; the disk is still backed.
            with contextlib.suppress(BackendError):
                if ctx.vm_virt(name).block_job(name, target) is not None:
                    ctx.vm_virt(name).block_job_abort(name, target)
            raise
    _verify_local(ctx, name, target)


def _verify_local(ctx: EngineContext, name: str, target: str) -> None:
    chain = ctx.vm_virt(name).disk_chain(name, target)
    if len(chain) != 1 or not chain[0].startswith("/"):
        raise BackendError(f"{target} still reads from {' <- '.join(chain)}")


_PROGRESS = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


def _qemu_img_with_progress(
    argv: list[str], job: JobHandle, target: str, progress: _Progress
) -> None:
    """Run a qemu-img command with -p, feeding its percentage into the job."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None and proc.stderr is not None
    buf = b""
    try:
        while chunk := proc.stdout.read1(4096):  # type: ignore[attr-defined]
            buf = (buf + chunk)[-256:]
            found = _PROGRESS.findall(buf.decode(errors="replace"))
            if found:
                progress.set_fraction(target, float(found[-1]) / 100)
            if job.cancel_requested:
                proc.terminate()
                proc.wait()
                raise JobCancelled()
        stderr = proc.stderr.read().decode(errors="replace").strip()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if proc.returncode != 0:
        raise BackendError(f"{argv[0]} {argv[1]} failed: {stderr}")


def _offline_mirror(
    job: JobHandle, target: str, overlay: str, dest: str, progress: _Progress
) -> None:
    job.update(step=f"copy {target}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dest)
    argv = [qemu_img.binary(), "convert", "-p", "-f", "qcow2", "-O", "qcow2", "-W", "-m", "8"]
    if job.params["bandwidth"]:
        argv += ["-r", str(job.params["bandwidth"])]
    try:
        _qemu_img_with_progress([*argv, overlay, dest], job, target, progress)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dest)
        raise
    if not qemu_img.compare(overlay, dest, "qcow2", "qcow2"):
        os.unlink(dest)
        raise BackendError(f"the copy of {target} differs from its source")


def _offline_stream(job: JobHandle, target: str, overlay: str, progress: _Progress) -> None:
    job.update(step=f"pull {target}")
    if qemu_img.info(overlay).backing_filename:
        # Safe mode copies every range the overlay lacks from the backing chain;
        # interrupted, it leaves a valid overlay that a rerun completes.
        _qemu_img_with_progress(
            [qemu_img.binary(), "rebase", "-p", "-f", "qcow2", "-b", "", overlay],
            job,
            target,
            progress,
        )
    if qemu_img.info(overlay).backing_filename:
        raise BackendError(f"{overlay} still has a backing file")


def _commit(ctx: EngineContext, job: JobHandle, disk_id: str, new_path: str) -> None:
    """Record the disk as local, remembering the old volume for cleanup, and give
    libvirt's persistent definition the new path."""
    with ctx.db.session() as s:
        disk = s.get(Disk, disk_id)
        assert disk is not None
        if disk.volume_path != new_path:
            job.update(
                params={**job.params, "old": {**job.params["old"], disk_id: disk.volume_path}}
            )
            disk.volume_path = new_path
        disk.storage_domain_id = job.params["to"]
        disk.external_url = None
        disk.external_format = None
        disk.external_read_only = None
        vm = disk.vm
        s.flush()
        ctx.vm_virt(vm.name).define(virt.domain_xml(vms.domain_spec(ctx, vm)))
        vm_id, vm_name = vm.id, vm.name
    bridges.stop(ctx, disk_id)  # QEMU reads nothing through it any more
    ctx.events.vm_changed(vm_id, vm_name)


def _cleanup_old(job: JobHandle, disk_id: str) -> None:
    old = job.params["old"].get(disk_id)
    if old:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old)


class _Progress:
    """Bytes done and total per disk and overall, with rate and ETA, written to
    the job at most every PROGRESS_INTERVAL."""

    def __init__(self, job: JobHandle) -> None:
        self.job = job
        self.disks: dict[str, dict[str, int]] = {}
        self.started = time.monotonic()
        self.start_done = 0
        self.last_write = 0.0

    def add(self, target: str, size: int, done: bool) -> None:
        self.disks[target] = {"done": size if done else 0, "total": size}
        self.start_done = sum(d["done"] for d in self.disks.values())

    def set(self, target: str, done: int, total: int) -> None:
        if total > 0:
            self.disks[target] = {"done": done, "total": total}
        self._maybe_write()

    def set_fraction(self, target: str, fraction: float) -> None:
        d = self.disks[target]
        self.set(target, int(d["total"] * fraction), d["total"])

    def snapshot(self, final: bool = False) -> dict[str, Any]:
        if final:
            for d in self.disks.values():
                d["done"] = d["total"]
        done = sum(d["done"] for d in self.disks.values())
        total = sum(d["total"] for d in self.disks.values())
        elapsed = max(time.monotonic() - self.started, 1e-3)
        rate = max(done - self.start_done, 0) / elapsed
        eta = (total - done) / rate if rate > 0 else None
        return {
            "disks": self.disks,
            "done": done,
            "total": total,
            "rate": int(rate),
            "eta": round(eta, 1) if eta is not None else None,
            "elapsed": round(elapsed, 1),
        }

    def _maybe_write(self) -> None:
        now = time.monotonic()
        if now - self.last_write >= PROGRESS_INTERVAL:
            self.last_write = now
            self.job.update(progress=self.snapshot())


def register(runner: JobRunner) -> None:
    runner.flows["import"] = run
