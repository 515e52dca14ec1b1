"""Bridges: the local nbdkit each NBD external disk, and each disk inside a tar
file (an OVA's), is read through (see thinair.adapters.nbdkit for why). One per
disk, named by the disk's id under THINAIR_HOME/bridges; started when the disk's
overlay is made, kept alive while
the disk is external, stopped when it becomes local or the VM goes away."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import select

from thinair.adapters import nbdkit, procfs, qemu_nbd
from thinair.adapters.nbd_address import NbdAddress
from thinair.db.models import Disk
from thinair.engine import working_sets
from thinair.engine.context import EngineContext
from thinair.errors import ExternalDiskError
from thinair.external import parse_url

log = logging.getLogger(__name__)

# The user QEMU runs as under qemu:///system on Debian; it must open the socket.
QEMU_USER = "libvirt-qemu"


# Formats QEMU reads but libvirt 9.0 cannot name as a backing format (its list
# has no vhdx): a disk in one is decoded by a local qemu-nbd bridge instead of
# nbdkit, and QEMU reads it raw from there.
DECODED = frozenset({"vhdx", "parallels"})
PROGRAMS = nbdkit.PROGRAMS | {"qemu-nbd"}


def bridged(url: str | None, fmt: str | None = None) -> bool:
    """NBD sources, disks inside tar files and formats libvirt cannot name are
    read through a bridge."""
    if url is None:
        return False
    ext = parse_url(url)
    return ext.is_nbd or ext.is_tar or fmt in DECODED


def source(ctx: EngineContext, disk_id: str, url: str, fmt: str) -> tuple[str, str]:
    """What the disk's overlay reads: (backing file, backing format)."""
    if not bridged(url, fmt):
        return url, fmt
    return backing_url(ctx, disk_id), "raw" if fmt in DECODED else fmt


def _dir(ctx: EngineContext) -> Path:
    path = ctx.settings.home / "bridges"
    path.mkdir(mode=0o755, exist_ok=True)
    return path


def _paths(ctx: EngineContext, name: str) -> tuple[Path, Path]:
    return _dir(ctx) / f"{name}.sock", _dir(ctx) / f"{name}.pid"


def backing_url(ctx: EngineContext, disk_id: str) -> str:
    """What QEMU reads: the bridge's socket."""
    return NbdAddress.unix(str(_paths(ctx, disk_id)[0])).url()


def _running(socket: Path, pid_file: Path) -> int | None:
    return procfs.from_pid_file(pid_file, PROGRAMS, str(socket))


def ensure(ctx: EngineContext, disk_id: str, url: str, fmt: str | None = None) -> bool:
    """Start the disk's bridge unless it runs already; True if it had to start."""
    socket, pid_file = _paths(ctx, disk_id)
    if _running(socket, pid_file) is not None:
        return False
    owner = QEMU_USER if ctx.settings.libvirt_uri.endswith("/system") else None
    try:
        if fmt in DECODED:
            pid = _start_decoder(url, fmt, socket, pid_file, owner)
        else:
            pid = nbdkit.start(
                url, socket, pid_file, ctx.settings.reconnect_window, owner, cache(ctx, disk_id)
            )
    except (nbdkit.BridgeError, qemu_nbd.ServerError) as e:
        raise ExternalDiskError(f"cannot bridge to {url}: {e}") from e
    log.info("bridge for disk %s to %s: pid %d", disk_id, url, pid)
    if fmt not in DECODED and parse_url(url).is_nbd:
        _prefetch(ctx, disk_id, url)
    return True


def cache(ctx: EngineContext, disk_id: str) -> nbdkit.Cache | None:
    """How an NBD bridge hides the source's latency (the settings bridge_*)."""
    s = ctx.settings
    if not s.bridge_cache:
        return None
    reads = _reads_log(ctx, disk_id)  # for the working set, and guest_reads()
    return nbdkit.Cache(s.bridge_cache_block_kib, reads, keep_file(reads))


def keep_file(reads_log: Path) -> Path:
    """The file whose presence lets a bridge's cache keep what it fetches
    (thinair.engine.readahead removes it once the cache is full)."""
    return reads_log.with_suffix(".keep")


def guest_reads(ctx: EngineContext, disk_id: str) -> nbdkit.ReadsWatch:
    """Whether the guest is reading from the disk's source right now (through
    its bridge's cache misses): an import's copier lets those reads go first."""
    return nbdkit.ReadsWatch(_reads_log(ctx, disk_id))


def _reads_log(ctx: EngineContext, disk_id: str) -> Path:
    return _dir(ctx) / f"{disk_id}.reads"


def logged(ctx: EngineContext) -> list[tuple[Path, Path]]:
    """(socket, reads log) of every cached bridge that runs (its socket is
    there), for thinair.engine.readahead."""
    found = []
    for reads in _dir(ctx).glob("*.reads"):
        socket = _paths(ctx, reads.stem)[0]
        if socket.exists():
            found.append((socket, reads))
    return found


def _prefetch(ctx: EngineContext, disk_id: str, url: str) -> None:
    """A new cached bridge fetches its source's boot working set first; the first
    time, that set may be in the log of another disk's bridge to the same source."""
    if not ctx.settings.working_set:
        return
    if working_sets.blocks(ctx, url) is None:
        with ctx.db.session() as s:
            others = s.scalars(select(Disk.id).where(Disk.external_url == url, Disk.id != disk_id))
            for other in others:
                if working_sets.record(ctx, url, _reads_log(ctx, other)):
                    break
    working_sets.prefetch(ctx, url, _paths(ctx, disk_id)[0])


def _start_decoder(url: str, fmt: str, socket: Path, pid_file: Path, owner: str | None) -> int:
    ext = parse_url(url)
    if ext.is_tls or ext.is_tar:
        raise nbdkit.BridgeError(f"a {fmt} disk over NBD with TLS or inside a tar is not supported")
    for stale in (socket, pid_file):
        stale.unlink(missing_ok=True)
    server = qemu_nbd.Server(
        url, fmt=fmt, unix_socket=str(socket), cache="writeback", aio="threads"
    )
    pid = server.start_detached(str(pid_file), str(socket.with_suffix(".log")))
    nbdkit.give_socket(socket, owner)
    return pid


def stop(ctx: EngineContext, disk_id: str, url: str | None = None) -> None:
    """Stop the disk's bridge; with the disk's source `url`, keep the working set
    its log holds, if that source has none yet."""
    socket, pid_file = _paths(ctx, disk_id)
    pid = _running(socket, pid_file)
    if pid is not None:
        procfs.terminate(pid, PROGRAMS, str(socket))
    reads = _reads_log(ctx, disk_id)
    if url is not None and ctx.settings.working_set:
        try:
            working_sets.record(ctx, url, reads)
        except OSError as e:  # an optimization only
            log.warning("could not keep the working set of %s: %s", url, e)
    for path in (socket, pid_file, socket.with_suffix(".log"), reads, keep_file(reads)):
        path.unlink(missing_ok=True)


@contextmanager
def temporary(ctx: EngineContext, url: str, window: float = 1) -> Iterator[str]:
    """A short-lived bridge, for reading a source only a bridge can read (NBD
    over TLS, a tar member) or that libnbd should read (an OVA over HTTP);
    yields the URL to give QEMU's tools or libnbd. It has no cache: a bulk
    copy through a disk's own (cached) bridge would fill its cache."""
    name = f"probe-{uuid.uuid4().hex[:12]}"
    socket, pid_file = _paths(ctx, name)
    try:
        nbdkit.start(url, socket, pid_file, window=window, owner=None)
        yield NbdAddress.unix(str(socket)).url()
    except nbdkit.BridgeError as e:
        raise ExternalDiskError(f"cannot read {url}: {e}") from e
    finally:
        nbdkit.stop(socket, pid_file)


def reconcile(ctx: EngineContext, wanted: dict[str, tuple[str, str | None]]) -> list[str]:
    """Keep the bridges of `wanted` ({disk id: (url, format)}) running and stop
    every other bridge under this engine's home."""
    actions = []
    for disk_id, (url, fmt) in wanted.items():
        try:
            if ensure(ctx, disk_id, url, fmt):
                actions.append(f"restarted the bridge of disk {disk_id}")
        except ExternalDiskError as e:  # its source is gone: its VM will say so
            actions.append(f"could not restart the bridge of disk {disk_id}: {e.message}")
    keep = {str(_paths(ctx, disk_id)[0]) for disk_id in wanted}
    for pid, line in procfs.find(PROGRAMS, str(_dir(ctx)) + "/").items():
        if not any(sock in line for sock in keep):
            sock = next(w for w in line.split() if w.endswith(".sock"))
            sock = sock.removeprefix("--socket=")
            procfs.terminate(pid, PROGRAMS, sock)
            suffixes = (".pid", ".reads", ".keep")
            for path in (Path(sock), *(Path(sock).with_suffix(s) for s in suffixes)):
                path.unlink(missing_ok=True)
            actions.append(f"stopped orphan bridge {pid}")
    return actions
