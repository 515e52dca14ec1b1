"""Import: make a VM's disks local on a target storage domain, running or stopped.

How, per disk (`disk move` moves one, local ones too):
- bulk, the default for an external disk: the copier (adapters/nbd_copy) copies
  the source's allocated data straight into the final volume, a raw file on the
  target domain, with many reads in flight on several connections, riding out a
  source restart as the disk's bridge does. It checkpoints as it goes,
  so an interrupted copy resumes where it was, in this job or the next one, and
  keeps a digest of every read, checked against the copy read back before
  anything else writes to it. Then only the guest's own writes move: a shallow
  mirror of the temporary disk onto the final volume (libvirt block copy with
  reuse-external: the final volume already holds what the temporary disk's
  backing holds), which QEMU flushes before it reports ready. For a stopped VM,
  `qemu-img commit` merges the temporary disk into the final volume instead.
  This is oVirt's live storage migration (bulk copy of the base, mirror of the
  top), against an external source.
- mirror: QEMU copies the whole chain into a new volume (libvirt block copy; for
  a stopped VM `qemu-img convert`). Moving a local disk does this: there is
  nothing remote to read fast.
- stream is the old name of libvirt's block pull into the temporary disk. QEMU's
  block-stream rewrites the overlay's header without flushing its metadata
  first (block/stream.c), so a QEMU killed after a pull of an idle guest's disk
  could leave it reading zeros. An import asked for with `stream` runs bulk,
  whose result is the same kind of disk, local on the target, durable at every
  instant.

The switch-over (running VM): the guest is paused for a few milliseconds while
the final volume is synced and its record says "switching"; from that record on
the final volume is the disk whatever happens to QEMU (it holds every write the
guest made: the mirror writes synchronously once ready, and the guest cannot
write while paused); then libvirt pivots, the database and libvirt's persistent
definition get the new volume, and the guest goes on. The temporary disk is
deleted and the source released only after that, so a crash at any instant
leaves the old chain or a complete local disk.

Every step is idempotent and reads what libvirt holds and the per-disk import
record (engine/import_state) before acting, so an engine that dies mid-import
resumes the job from where the disk is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from thinair import models
from thinair.adapters import nbd_client, nbd_copy, qemu_img, qemu_nbd, virt
from thinair.adapters.errors import CommandFailed
from thinair.adapters.virt import Virt
from thinair.db.models import LOCAL_HOST_ID, Disk, StorageDomain, Vm, new_id
from thinair.engine import bridges, exports, import_state, machines, storage
from thinair.engine.context import EngineContext
from thinair.engine.faults import crash_point
from thinair.engine.import_state import DiskImport
from thinair.engine.job_params import ImportParams, Strategy
from thinair.engine.jobs import JobCancelled, JobHandle, JobRunner
from thinair.errors import BackendError, Conflict, InvalidInput, StorageError
from thinair.external import parse_url
from thinair.states import DOMAIN_LIVE, DomainState, VmPhase, require_phase

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
    one disk, as `disk move` does: an external one is imported, a local one
    copied to the target domain."""
    with ctx.db.session() as s:
        vm = machines.find(s, ref)
        require_phase(vm, VmPhase.READY)
        target_sd = storage.find(s, req.to)
        disks = [d for d in vm.disks if only_disk in (None, d.id, d.target)]
        if only_disk is not None and not disks:
            raise InvalidInput(f"VM {vm.name!r} has no disk {only_disk!r}")
        if only_disk is None:
            chosen = [d for d in disks if d.external_url]
            if not chosen:
                raise Conflict(
                    f"VM {vm.name!r} has no external disk to import: "
                    f"{', '.join(d.target for d in disks)} local already"
                )
        else:
            chosen = [d for d in disks if d.external_url or d.storage_domain_id != target_sd.id]
            if not chosen:
                raise Conflict(
                    f"disk {disks[0].target} of {vm.name!r} is local on {target_sd.name!r} already"
                )
        plan = {d.id: _method(d, req.strategy) for d in chosen}
        storage.check_space(ctx, target_sd, sum(_needed_bytes(d) for d in chosen))
        params = ImportParams(
            to=target_sd.id,
            bandwidth=int(req.bandwidth_mib * 2**20) if req.bandwidth_mib else None,
            strategies=plan,
            verify=req.verify,
            disks=[d.id for d in chosen],
        )
        vm_id = vm.id
    return runner.submit("import", vm_id, params)


def _method(disk: Disk, asked: str | None) -> Strategy:
    """bulk for an external disk unless mirror is asked for; mirror for a local one."""
    if disk.external_url is None or asked == "mirror":
        return "mirror"
    return "bulk"


def _needed_bytes(disk: Disk) -> int:
    """What the copy will allocate: qemu-img measure over the whole chain (it reads
    the source's allocation map, so a sparse 1 TiB source measures small)."""
    try:
        return qemu_img.measure(disk.volume_path, "qcow2", disk.volume_format)
    except CommandFailed as e:
        raise BackendError(f"cannot measure {disk.target}: {e.stderr}") from e


# -- running -------------------------------------------------------------------


def run(ctx: EngineContext, job: JobHandle[ImportParams]) -> None:
    assert job.vm_id is not None
    with ctx.vm_busy(job.vm_id, "import"):
        with ctx.db.session() as s:
            vm = s.get(Vm, job.vm_id)
            if vm is None:
                raise Conflict("the VM was removed")
            name, host_id = vm.name, vm.host_id
        # The VM's host, found once: the flow calls libvirt there many times a
        # second while it follows a copy, and the VM is held (it cannot move).
        virt_ = ctx.host_virt(host_id)
        progress = _Progress(job)
        sources: set[str] = set()  # what the disks read from before the import
        with ctx.db.session() as s:
            for disk_id in job.params.disks:
                disk = s.get(Disk, disk_id)
                if disk is None:
                    raise Conflict("the disk was removed")
                progress.add(disk.target, disk.virtual_size, _done(disk, job))
                if disk.external_url:
                    sources.add(disk.external_url)
        machines.ensure_bridges(ctx, job.vm_id)  # the VM reads through them until the switch
        for disk_id in job.params.disks:
            job.check_cancel()
            _import_disk(ctx, job, name, virt_, disk_id, progress)
        exports.release(ctx, sources)  # one of thinair's own exports, if nothing else reads it
        job.update(step="done", progress=progress.snapshot(final=True))


def _done(disk: Disk, job: JobHandle[ImportParams]) -> bool:
    return disk.external_url is None and disk.storage_domain_id == job.params.to


def _import_disk(
    ctx: EngineContext,
    job: JobHandle[ImportParams],
    name: str,
    virt_: Virt,
    disk_id: str,
    progress: _Progress,
) -> None:
    with ctx.db.session() as s:
        disk = s.get(Disk, disk_id)
        assert disk is not None
        if _done(disk, job):
            _cleanup(ctx, job, disk_id)
            return
        target, source = disk.target, disk.external_url
        sd = s.get(StorageDomain, job.params.to)
        assert sd is not None
        method = job.params.strategies[disk_id]
        if method == "stream":  # a job submitted before stream was retired
            method = "bulk"
        state = _state(ctx, disk, sd, method)
    try:
        if method == "bulk":
            _bulk(ctx, job, name, virt_, disk_id, state, progress)
        else:
            _mirror(ctx, job, name, virt_, disk_id, state, progress)
    except JobCancelled:
        if _phase(ctx, disk_id) not in import_state.COMMITTED:
            import_state.discard(ctx, disk_id)  # the partial copy goes
        raise
    except BackendError as e:
        if full := _storage_problem(ctx, job.params.to):
            if _phase(ctx, disk_id) not in import_state.COMMITTED:
                import_state.discard(ctx, disk_id)
            raise StorageError(
                f"{full}: the copy of {target} stopped; the partial copy is deleted and the "
                "VM runs on its temporary disk. Free some space and run the import again"
            ) from e
        try:
            running = virt_.state(name) in DOMAIN_LIVE
        except BackendError:
            running = False
        if running and source and (problem := _source_problem(ctx, source)):
            raise BackendError(
                f"the source of {target} is gone ({problem}); the VM runs on what it has, "
                "and `import` run again resumes the copy once the source is back"
            ) from e
        raise
    _cleanup(ctx, job, disk_id)


def _state(ctx: EngineContext, disk: Disk, sd: StorageDomain, method: str) -> DiskImport:
    """The disk's import record: the one an earlier job left if it goes to the
    same place the same way (or is past the point of no return), else a new one."""
    state = import_state.load(ctx, disk.id)
    if state is not None and (
        state.phase in import_state.COMMITTED
        or (state.to == sd.id and state.method == method and os.path.exists(state.dest))
    ):
        return state
    import_state.discard(ctx, disk.id)
    if method == "bulk":
        dest_format = "raw"
    else:  # a local disk keeps its format; a whole chain becomes one qcow2
        dest_format = disk.volume_format if disk.external_url is None else "qcow2"
    state = DiskImport(
        disk_id=disk.id,
        dest=str(Path(sd.path) / f"{new_id()}.{dest_format}"),
        dest_format=dest_format,
        to=sd.id,
        method=method,
    )
    import_state.save(ctx, state)  # before the volume exists: rollback finds it
    return state


def _phase(ctx: EngineContext, disk_id: str) -> str | None:
    state = import_state.load(ctx, disk_id)
    return state.phase if state else None


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


def _running(virt_: Virt, name: str) -> bool:
    return virt_.state(name) in DOMAIN_LIVE


def _gone(virt_: Virt, name: str, wait: float = 5.0) -> bool:
    """Whether the VM's QEMU is gone, giving libvirt `wait` seconds to notice a
    QEMU that died just now (its calls fail before its state says so)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            if not _running(virt_, name):
                return True
        except BackendError:
            return False  # libvirt itself is away: nothing to tell
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


STOPPED = (
    "the VM stopped while {target} was being copied; start it and run the import "
    "again: it resumes from what was copied"
)


# -- bulk: the copier, then the guest's writes -----------------------------------


def _bulk(
    ctx: EngineContext,
    job: JobHandle[ImportParams],
    name: str,
    virt_: Virt,
    disk_id: str,
    state: DiskImport,
    progress: _Progress,
) -> None:
    with ctx.db.session() as s:
        disk = s.get(Disk, disk_id)
        assert disk is not None
        target, overlay = disk.target, disk.volume_path
        url, fmt = disk.external_url, disk.external_format
        local = disk.vm.host_id in (None, LOCAL_HOST_ID)
    assert url is not None and fmt is not None
    if state.phase == "copy":
        with _copy_source(ctx, disk_id, url, fmt, local) as source:
            direct = local and source == url  # the bridge is here and reads the same bytes
            _bulk_copy(ctx, job, name, target, source, state, progress, direct=direct)
            _verify(ctx, job, name, target, source, state)
    if state.phase == "switching" or _running(virt_, name):
        # (switching: the copy is the disk already, whether QEMU still runs or not)
        try:
            _live_copy(ctx, job, name, virt_, target, disk_id, state, progress, shallow=True)
            return
        except BackendError:
            if state.phase in import_state.COMMITTED or not _gone(virt_, name):
                raise
            log.info("%s stopped before its switch-over: merging %s offline", name, target)
    _offline_merge(ctx, job, virt_, target, overlay, disk_id, state, progress)


@contextlib.contextmanager
def _copy_source(
    ctx: EngineContext, disk_id: str, url: str, fmt: str, local: bool
) -> Iterator[str]:
    """An NBD URL serving the disk's source as raw bytes. A raw NBD source is
    read directly (the copier rides out a restart itself, and a hop through the
    bridge would cost CPU the copy needs); anything else through a qemu-nbd of
    our own decoding what the temporary disk reads (a qcow2 chain or a VMDK over
    HTTP, an OVA member, ...). A VM on another host has no bridge here."""
    ext = parse_url(url)
    if fmt == "raw" and ext.is_nbd and not ext.is_tar:
        yield url
        return
    backing, backing_format = bridges.source(ctx, disk_id, url, fmt) if local else (url, fmt)
    if backing_format == "raw" and backing.startswith("nbd"):
        yield backing
        return
    socket = ctx.settings.home / "bridges" / f"copy-{disk_id}.sock"
    socket.unlink(missing_ok=True)
    server = qemu_nbd.Server(
        backing,
        fmt=backing_format,
        unix_socket=str(socket),
        shared=nbd_copy.CONNECTIONS,
        cache="writeback",
        aio="threads",
    )
    try:
        server.start(timeout=60)
    except qemu_nbd.ServerError as e:
        raise BackendError(f"cannot read {url} to copy it: {e}") from e
    try:
        yield server.url
    finally:
        server.stop()
        socket.unlink(missing_ok=True)


def _bulk_copy(
    ctx: EngineContext,
    job: JobHandle[ImportParams],
    name: str,
    target: str,
    source: str,
    state: DiskImport,
    progress: _Progress,
    direct: bool = False,
) -> None:
    job.update(step=f"copy {target}")
    # The guest reads first; what its bridge fetched (the source read raw,
    # `direct`) is read from the bridge's cache, not over the link again.
    guest = bridges.guest_reads(ctx, state.disk_id)
    near = (bridges.backing_url(ctx, state.disk_id), guest.covers) if direct else None

    def on_checkpoint(checkpoint: nbd_copy.Checkpoint) -> None:
        # Kept: a synced checkpoint, and the first unsynced one of this run (it
        # names the boot; the copier finds the later ones in its digest file).
        # Saved at every checkpoint (synced, renamed over the old one), the
        # record slowed the copy of 8 GiB here by up to 1.6x: even unsynced, a
        # rename per checkpoint made the disk's writes queue 10x as long.
        if not checkpoint.boot or checkpoint.boot != state.checkpoint.boot:
            state.checkpoint = checkpoint
            import_state.save(ctx, state)
        crash_point("import-checkpoint", name)

    def on_progress(done: int, total: int) -> None:
        state.total = total
        progress.set(target, done, total)

    began = time.monotonic()
    try:
        nbd_copy.copy(
            source,
            state.dest,
            str(import_state.digests_path(ctx, state.disk_id)),
            start=state.checkpoint,
            bandwidth=job.params.bandwidth,
            on_progress=on_progress,
            on_checkpoint=on_checkpoint,
            should_stop=lambda: job.cancel_requested,
            window=ctx.settings.reconnect_window,
            guest_busy=guest.busy,
            cached=near,
        )
    except nbd_copy.CopyStopped as e:
        raise JobCancelled() from e
    except nbd_copy.CopyMismatch as e:
        where = nbd_copy.first_difference(source, state.dest, e.offset, e.length)
        _mismatch(ctx, target, state, where)
    except (nbd_copy.CopyError, OSError) as e:
        raise BackendError(f"copying {target} stopped: {e}") from e
    log.info("%s: copied %s in %.2f s", name, target, time.monotonic() - began)
    crash_point("import-copied", name)


def _mismatch(ctx: EngineContext, target: str, state: DiskImport, where: int) -> None:
    import_state.discard(ctx, state.disk_id)
    raise BackendError(
        f"the copy of {target} differs from its source at byte {where}: it is deleted, "
        "and the VM runs on its temporary disk; run the import again"
    )


def _verify(
    ctx: EngineContext,
    job: JobHandle[ImportParams],
    name: str,
    target: str,
    source: str,
    state: DiskImport,
) -> None:
    """The copier checked the copy against what it read; with verify=full it is
    also compared with the source, read again."""
    if job.params.verify == "full":
        job.update(step=f"verify {target}")
        where = qemu_img.first_difference(state.dest, source, "raw", "raw")
        if where is not None:
            _mismatch(ctx, target, state, where)
    state.phase = "verified"
    import_state.save(ctx, state)
    crash_point("import-verified", name)


def _live_copy(
    ctx: EngineContext,
    job: JobHandle[ImportParams],
    name: str,
    virt_: Virt,
    target: str,
    disk_id: str,
    state: DiskImport,
    progress: _Progress,
    shallow: bool,
) -> None:
    """A libvirt block copy onto the destination (shallow: the temporary disk's
    own clusters onto a copy of its backing; else the whole chain into a new
    volume), then the switch-over. A copy that does not get there is cancelled:
    a shallow one's destination stays (still a copy of the source), a whole
    one's goes."""
    if state.phase == "switching":
        _finish_switch(ctx, job, name, virt_, target, disk_id, state, progress)
        return
    try:
        if virt_.block_job(name, target) is None:
            if shallow:
                state.phase = "mirror"
                import_state.save(ctx, state)
                job.update(step=f"merge {target}")
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(state.dest)  # a partial copy from before a restart
                job.update(step=f"copy {target}")
            # QEMU's mirror keeps at most 16 x 1 MiB reads in flight on one
            # connection, whatever the buffer size: libvirt's defaults stay.
            virt_.block_copy(
                name,
                target,
                state.dest,
                state.dest_format,
                bandwidth=job.params.bandwidth,
                shallow=shallow,
                reuse_external=shallow,
            )
        _wait_ready(job, name, virt_, target, state.dest, progress)
        job.check_cancel()
    except BaseException as e:
        _abandon_mirror(virt_, name, target, state.dest, delete=not shallow)
        if isinstance(e, BackendError) and _gone(virt_, name):
            raise BackendError(STOPPED.format(target=target)) from e
        raise
    _switch(ctx, job, name, virt_, target, disk_id, state)


def _offline_merge(
    ctx: EngineContext,
    job: JobHandle[ImportParams],
    virt_: Virt,
    target: str,
    overlay: str,
    disk_id: str,
    state: DiskImport,
    progress: _Progress,
) -> None:
    """A stopped VM: point the temporary disk at the bulk copy (the same bytes as
    its source) and commit its clusters into it. From the record "merging" on,
    the temporary disk reads the copy; every step runs again as it is."""
    if state.phase != "merging":
        state.phase = "merging"
        import_state.save(ctx, state)
    job.update(step=f"merge {target}")
    try:
        qemu_img.rebase(overlay, state.dest, "raw", unsafe=True)
        # No should_stop: past the point of no return, a cancel waits for the end.
        qemu_img.commit(overlay, on_progress=lambda f: progress.set_fraction(target, f))
    except CommandFailed as e:
        raise BackendError(f"merging {target} into its copy failed: {e.stderr}") from e
    _sync(state.dest)
    _commit(ctx, job, virt_, disk_id, state)


# -- mirror: QEMU copies the whole chain -------------------------------------------


def _mirror(
    ctx: EngineContext,
    job: JobHandle[ImportParams],
    name: str,
    virt_: Virt,
    disk_id: str,
    state: DiskImport,
    progress: _Progress,
) -> None:
    with ctx.db.session() as s:
        disk = s.get(Disk, disk_id)
        assert disk is not None
        target, volume, volume_format = disk.target, disk.volume_path, disk.volume_format
    if _running(virt_, name):
        _live_copy(ctx, job, name, virt_, target, disk_id, state, progress, shallow=False)
        return
    if state.phase == "switching":  # the copy was complete and checked
        _commit(ctx, job, virt_, disk_id, state)
        return
    job.update(step=f"copy {target}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state.dest)
    try:
        qemu_img.convert(
            volume,
            state.dest,
            volume_format,
            state.dest_format,
            bandwidth=job.params.bandwidth,
            on_progress=lambda f: progress.set_fraction(target, f),
            should_stop=lambda: job.cancel_requested,
        )
        same = qemu_img.compare(volume, state.dest, volume_format, state.dest_format)
    except qemu_img.Stopped as e:
        raise JobCancelled() from e
    except CommandFailed as e:
        raise BackendError(f"copying {target} failed: {e.stderr}") from e
    if not same:
        raise BackendError(f"the copy of {target} differs from its source")
    _sync(state.dest)
    state.phase = "switching"
    import_state.save(ctx, state)
    _commit(ctx, job, virt_, disk_id, state)


# -- following libvirt's block job --------------------------------------------------


def _wait_ready(
    job: JobHandle[ImportParams],
    name: str,
    virt_: Virt,
    target: str,
    dest: str,
    progress: _Progress,
) -> None:
    if virt_.mirror_ready(name, target):
        return
    with _flushing(dest) as flush:
        event = _wait_job(job, name, virt_, target, progress, (virt.JOB_READY,), flush)
    if event != virt.JOB_READY and not virt_.mirror_ready(name, target):
        raise BackendError(f"the copy of {target} ended before it was ready")


def _wait_job(
    job: JobHandle[ImportParams],
    name: str,
    virt_: Virt,
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
        event = virt_.wait_block_event(name, target, interval)
        if tick is not None:
            tick()
        try:
            info = _block_job_info(virt_, name, target)
        except BackendError as e:
            if not _running(virt_, name):
                raise BackendError(STOPPED.format(target=target)) from e
            raise
        if info is not None:
            progress.set_merge(target, *info)
        if event in until:
            return event
        if event in (virt.JOB_FAILED, virt.JOB_CANCELED):
            raise BackendError(
                f"copying {target} {event}: see the engine's log and "
                "libvirt's for the reason (is the source still reachable?)"
            )
        if info is None and event is None:
            if not _running(virt_, name):
                raise BackendError(STOPPED.format(target=target))
            return ""  # the job ended with no event we saw (e.g. before a restart)
        if job.cancel_requested:
            raise JobCancelled()


def _block_job_info(virt_: Virt, name: str, target: str) -> tuple[int, int] | None:
    """The block job's progress, riding out a libvirtd restart: the copy goes on
    in QEMU meanwhile, and libvirtd picks the job up again when it starts."""
    try:
        return virt_.block_job(name, target)
    except BackendError:
        virt_.wait_connected(LIBVIRT_RESTART_WAIT)
        return virt_.block_job(name, target)


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


def _sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _abandon_mirror(virt_: Virt, name: str, target: str, dest: str, delete: bool) -> None:
    """Cancel a copy that did not switch: the VM keeps running on its temporary
    disk. A bulk copy stays (it is still a copy of the source; the next merge
    writes every cluster of the temporary disk again)."""
    try:
        if virt_.state(name) in DOMAIN_LIVE:
            if virt_.disk_chain(name, target)[0] == dest:
                return  # it did switch: keep the destination
            if virt_.block_job(name, target) is not None:
                virt_.block_job_abort(name, target, pivot=False)
                deadline = time.monotonic() + 30
                while virt_.block_job(name, target) is not None and time.monotonic() < deadline:
                    time.sleep(0.1)
    except BackendError:
        log.exception("could not cancel the copy of %s %s", name, target)
    if delete:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dest)


# -- the switch-over -----------------------------------------------------------------


def _switch(
    ctx: EngineContext,
    job: JobHandle[ImportParams],
    name: str,
    virt_: Virt,
    target: str,
    disk_id: str,
    state: DiskImport,
) -> None:
    """The mirror is ready: pause the guest, make the destination durable and
    record it as the disk, pivot, resume, then give the database and libvirt's
    persistent definition the new volume (see the module's docstring). Only
    what the pause protects is inside it: the job holds the VM until the end,
    so nobody starts it from an old definition meanwhile, and a job resumed
    after a crash finishes from the "switching" record."""
    job.update(step=f"switch {target}")
    # Written back while the guest runs, so that the sync in the pause has only
    # the last moments' writes to flush (a whole-disk mirror leaves the whole
    # copy dirty in the page cache).
    _sync(state.dest)
    virt_.suspend(name)
    try:
        _sync(state.dest)
        state.phase = "switching"
        import_state.save(ctx, state)
        crash_point("import-switching", name)
        try:
            _pivot(virt_, name, target, state.dest)
        except BackendError:
            if _running(virt_, name) and virt_.disk_chain(name, target)[0] != state.dest:
                # Still on the temporary disk, and the guest wrote nothing
                # since: the temporary disk stays the disk.
                state.phase = "mirror"
                import_state.save(ctx, state)
                raise
            # QEMU is gone (the destination is the disk now) or it did switch.
        crash_point("import-pivoted", name)
    finally:
        with contextlib.suppress(BackendError):
            if virt_.state(name) == DomainState.PAUSED:
                virt_.resume(name)
    _commit(ctx, job, virt_, disk_id, state)


def _pivot(virt_: Virt, name: str, target: str, dest: str) -> None:
    virt_.block_job_abort(name, target, pivot=True)
    deadline = time.monotonic() + 60
    while virt_.disk_chain(name, target)[0] != dest:
        if time.monotonic() > deadline:
            raise BackendError(f"libvirt did not switch {target} to {dest}")
        virt_.wait_block_event(name, target, 0.2)


def _finish_switch(
    ctx: EngineContext,
    job: JobHandle[ImportParams],
    name: str,
    virt_: Virt,
    target: str,
    disk_id: str,
    state: DiskImport,
    progress: _Progress,
) -> None:
    """An engine that died during the switch-over: the guest is still paused (we
    paused it), or QEMU is gone. Either way the destination is the disk."""
    if virt_.state(name) in DOMAIN_LIVE:
        chain = virt_.disk_chain(name, target)
        if chain[0] != state.dest:
            if virt_.block_job(name, target) is None or not virt_.mirror_ready(name, target):
                # No mirror to pivot (libvirt lost it): the guest has been paused
                # since the destination was synced, so the temporary disk holds
                # the same data; merge again from it.
                state.phase = "mirror"
                import_state.save(ctx, state)
                with contextlib.suppress(BackendError):
                    if virt_.state(name) == DomainState.PAUSED:
                        virt_.resume(name)
                _live_copy(ctx, job, name, virt_, target, disk_id, state, progress, shallow=True)
                return
            _pivot(virt_, name, target, state.dest)
        _commit(ctx, job, virt_, disk_id, state)
        with contextlib.suppress(BackendError):
            if virt_.state(name) == DomainState.PAUSED:
                virt_.resume(name)
        return
    _commit(ctx, job, virt_, disk_id, state)


def _commit(
    ctx: EngineContext, job: JobHandle[ImportParams], virt_: Virt, disk_id: str, state: DiskImport
) -> None:
    """Record the disk as local on the state's volume, remembering the old volume
    for cleanup, and give libvirt's persistent definition the new path."""
    new_path = state.dest
    with ctx.db.session() as s:
        disk = s.get(Disk, disk_id)
        assert disk is not None
        if disk.volume_path != new_path:
            job.update(params={"old": {**job.params.old, disk_id: disk.volume_path}})
            disk.volume_path = new_path
        disk.volume_format = state.dest_format
        disk.storage_domain_id = state.to
        disk.external_url = None
        disk.external_format = None
        disk.external_read_only = None
        vm = disk.vm
        s.flush()
        virt_.define(virt.domain_xml(machines.domain_spec(ctx, vm)))
        vm_id, vm_name = vm.id, vm.name
    crash_point("import-committed", vm_name)
    bridges.stop(ctx, disk_id)  # QEMU reads nothing through it any more
    ctx.events.vm_changed(vm_id, vm_name)


def _cleanup(ctx: EngineContext, job: JobHandle[ImportParams], disk_id: str) -> None:
    """The disk is local on the target: delete the temporary disk and the record."""
    old = job.params.old.get(disk_id)
    if old:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old)
    with ctx.db.session() as s:
        disk = s.get(Disk, disk_id)
        keep = disk.volume_path if disk else None
    import_state.discard(ctx, disk_id, keep=keep)


class _Progress:
    """Bytes done and total per disk and overall, with rate and ETA, written to
    the job at most every PROGRESS_INTERVAL. A disk's bytes are its bulk copy's
    (the source's allocated data: holes are not counted, so the rate is that of
    bytes copied) or, for a whole-chain mirror, QEMU's."""

    def __init__(self, job: JobHandle[ImportParams]) -> None:
        self.job = job
        self.disks: dict[str, dict[str, int]] = {}
        self.bulk: dict[str, int] = {}  # per disk, what the bulk copy moved
        self.started = time.monotonic()
        self.start_done = 0
        self.last_write = 0.0

    def add(self, target: str, size: int, done: bool) -> None:
        self.disks[target] = {"done": size if done else 0, "total": size}
        self.start_done = sum(d["done"] for d in self.disks.values())

    def set(self, target: str, done: int, total: int) -> None:
        if total > 0:
            self.disks[target] = {"done": done, "total": total}
            self.bulk[target] = total
        self._maybe_write()

    def set_merge(self, target: str, done: int, total: int) -> None:
        """The block job's bytes: a whole-chain mirror's copy. After a bulk copy
        the disk's bytes stay the bulk copy's: the shallow mirror's own figures
        (QEMU counts the whole disk there) would say nothing of the guest's
        writes it moves, which take a fraction of a second."""
        if total > 0 and target not in self.bulk:
            self.disks[target] = {"done": done, "total": total}
        self._maybe_write()

    def set_fraction(self, target: str, fraction: float) -> None:
        d = self.disks[target]
        self.disks[target] = {"done": int(d["total"] * fraction), "total": d["total"]}
        self._maybe_write()

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
    runner.register("import", run, ImportParams)
