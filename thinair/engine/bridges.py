"""Bridges: the local nbdkit each NBD external disk is read through (see
thinair.adapters.nbdkit for why). One per disk, named by the disk's id under
THINAIR_HOME/bridges; started when the disk's overlay is made, kept alive while
the disk is external, stopped when it becomes local or the VM goes away."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from thinair.adapters import nbdkit
from thinair.engine.context import EngineContext
from thinair.errors import ExternalDiskError
from thinair.external import parse_url

log = logging.getLogger(__name__)

# The user QEMU runs as under qemu:///system on Debian; it must open the socket.
QEMU_USER = "libvirt-qemu"


def bridged(url: str | None) -> bool:
    return url is not None and parse_url(url).scheme in ("nbd", "nbd+unix", "nbds", "nbds+unix")


def _dir(ctx: EngineContext) -> Path:
    path = ctx.settings.home / "bridges"
    path.mkdir(mode=0o755, exist_ok=True)
    return path


def _paths(ctx: EngineContext, name: str) -> tuple[Path, Path]:
    return _dir(ctx) / f"{name}.sock", _dir(ctx) / f"{name}.pid"


def backing_url(ctx: EngineContext, disk_id: str) -> str:
    """What QEMU reads: the bridge's socket."""
    return f"nbd+unix:///?socket={_paths(ctx, disk_id)[0]}"


def ensure(ctx: EngineContext, disk_id: str, url: str) -> bool:
    """Start the disk's bridge unless it runs already; True if it had to start."""
    socket, pid_file = _paths(ctx, disk_id)
    if nbdkit.running(socket, pid_file) is not None:
        return False
    owner = QEMU_USER if ctx.settings.libvirt_uri.endswith("/system") else None
    try:
        pid = nbdkit.start(url, socket, pid_file, ctx.settings.reconnect_window, owner)
    except nbdkit.BridgeError as e:
        raise ExternalDiskError(f"cannot bridge to {url}: {e}") from None
    log.info("bridge for disk %s to %s: pid %d", disk_id, url, pid)
    return True


def stop(ctx: EngineContext, disk_id: str) -> None:
    nbdkit.stop(*_paths(ctx, disk_id))


@contextmanager
def temporary(ctx: EngineContext, url: str) -> Iterator[str]:
    """A short-lived bridge, for probing a source only the bridge can read
    (NBD over TLS); yields the URL to give QEMU's tools."""
    name = f"probe-{uuid.uuid4().hex[:12]}"
    socket, pid_file = _paths(ctx, name)
    try:
        nbdkit.start(url, socket, pid_file, window=1, owner=None)
        yield f"nbd+unix:///?socket={socket}"
    except nbdkit.BridgeError as e:
        raise ExternalDiskError(f"cannot read {url}: {e}") from None
    finally:
        nbdkit.stop(socket, pid_file)


def reconcile(ctx: EngineContext, wanted: dict[str, str]) -> list[str]:
    """Keep the bridges of `wanted` ({disk id: url}) running and stop every other
    bridge under this engine's home."""
    actions = []
    for disk_id, url in wanted.items():
        try:
            if ensure(ctx, disk_id, url):
                actions.append(f"restarted the bridge of disk {disk_id}")
        except ExternalDiskError as e:  # its source is gone: its VM will say so
            actions.append(f"could not restart the bridge of disk {disk_id}: {e.message}")
    keep = {str(_paths(ctx, disk_id)[0]) for disk_id in wanted}
    for pid, line in nbdkit.find_all(_dir(ctx)).items():
        if not any(sock in line for sock in keep):
            sock = next(w for w in line.split() if w.endswith(".sock"))
            nbdkit.stop(Path(sock), Path(sock).with_suffix(".pid"))
            actions.append(f"stopped orphan bridge {pid}")
    return actions
