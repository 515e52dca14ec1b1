"""Exports: serve an image read-only over NBD (qemu-nbd) or HTTP (nginx), with
TLS where asked, from a server process that outlives the engine.

Each export is a record (written first, phase creating) that owns a directory
THINAIR_HOME/exports/ID (0700: pid file, server log, TLS keys, nginx
configuration) and one server process. The process's command line names that
directory, which is how the engine recognises it after a restart: a live one
is adopted, a dead one started again on the same address, and a process whose
record is gone is stopped. Processes that do not name a directory under this
THINAIR_HOME's exports are never touched.

An export of a running VM's disk (vm and disk instead of an image) freezes the
disk's volume behind a new overlay (a libvirt disk-only snapshot: the guest
writes there from then on) and serves the frozen volume; removing the export
merges the overlay back (block commit) so the VM is on its own volume again.
The VM is held busy meanwhile: no stop, import or rollback until then.

The package splits by concern: urls (paths, URLs, input checks), servers (the
server processes), disk (a VM disk's freeze and merge back), reconcile. This
module keeps the flows callers use. One create or remove at a time
(ctx.exports_lock): names and ports are chosen under it; ctx.exports_held keeps
the VMs held busy by exports of their disks.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack

from sqlalchemy import select
from sqlalchemy.orm import Session

from thinair import models
from thinair.adapters import procfs
from thinair.adapters.errors import CommandFailed
from thinair.db import refs
from thinair.db.models import Disk, Export, aware, new_id
from thinair.engine.context import EngineContext
from thinair.engine.exports.disk import freeze, vm_disk
from thinair.engine.exports.reconcile import reconcile
from thinair.engine.exports.servers import (
    NBD_PROGRAMS,
    PROGRAMS,
    alive,
    destroy,
    make_credentials,
    mine,
    start,
)
from thinair.engine.exports.urls import (
    DEFAULT_HOST,
    PSK_IDENTITY,
    check_image,
    check_port_free,
    check_socket_path,
    check_tls_dir,
    default_name,
    default_tls,
    export_dir,
    exposure_warning,
    free_port,
    is_loopback,
    parse_listen,
    root,
    tls_files,
    url,
)
from thinair.engine.faults import crash_point
from thinair.errors import BackendError, Conflict, InvalidInput

__all__ = [
    "DEFAULT_HOST",
    "NBD_PROGRAMS",
    "PROGRAMS",
    "PSK_IDENTITY",
    "create",
    "export_dir",
    "exposure_warning",
    "find",
    "get",
    "is_loopback",
    "list_all",
    "mine",
    "reconcile",
    "release",
    "remove",
    "root",
    "to_model",
    "url",
]

log = logging.getLogger(__name__)


def find(s: Session, ref: str) -> Export:
    """By name, id or a unique prefix of its id."""
    return refs.find(s, Export, ref, "export", list_existing=True)


def to_model(ctx: EngineContext, e: Export) -> models.Export:
    # Another engine's server runs on its machine: what its record says, no more.
    running = alive(ctx, e) if mine(ctx, e) else e.phase == "ready" and e.error is None
    clients = bytes_read = None
    if running and e.pid is not None and mine(ctx, e):
        clients = procfs.unix_clients(e.socket) if e.socket else procfs.tcp_clients(e.port or 0)
        if e.protocol == "nbd":
            bytes_read = procfs.bytes_read(e.pid)
    return models.Export(
        id=e.id,
        name=e.name,
        image=e.image,
        format=e.format,
        virtual_size=e.virtual_size,
        protocol=e.protocol,  # type: ignore[arg-type]
        url=url(ctx, e),
        host=e.host,
        port=e.port,
        socket=e.socket,
        tls=e.tls,  # type: ignore[arg-type]
        vm_id=e.vm_id,
        disk=e.disk,
        state="running" if running else "stopped",
        phase=e.phase,
        pid=e.pid if running else None,
        clients=clients,
        bytes_read=bytes_read,
        error=e.error,
        created_at=aware(e.created_at),
        engine=e.engine,
        warning=exposure_warning(e),
        **tls_files(ctx, e),
    )


def list_all(ctx: EngineContext) -> list[models.Export]:
    with ctx.db.session() as s:
        return [to_model(ctx, e) for e in s.scalars(select(Export).order_by(Export.name))]


def get(ctx: EngineContext, ref: str) -> models.Export:
    with ctx.db.session() as s:
        return to_model(ctx, find(s, ref))


def create(ctx: EngineContext, req: models.ExportCreate) -> models.Export:
    """Check everything, then record the export, make its keys and start its server."""
    if (req.image is None) == (req.vm is None):
        raise InvalidInput("give either an image or a VM (--vm NAME --disk vda)")
    if req.disk is not None and req.vm is None:
        raise InvalidInput("--disk goes with --vm")
    hold = ExitStack()
    try:
        return _create(ctx, req, hold)
    except BaseException:
        hold.close()
        raise


def _create(ctx: EngineContext, req: models.ExportCreate, hold: ExitStack) -> models.Export:
    vm_id = None
    if req.vm is not None:
        if req.protocol == "http":
            raise InvalidInput("a VM's disk is exposed over NBD only (its volume is a layer)")
        vm_id, image, fmt, size = vm_disk(ctx, req, hold)
    else:
        assert req.image is not None
        image = req.image
        fmt, size = check_image(ctx, req)
    host, port = parse_listen(req.listen)
    req = req.model_copy(update={"tls": default_tls(req, host)})
    check_tls_dir(ctx, req)
    if req.unix is not None:
        if req.listen:
            raise InvalidInput("give --listen or --unix, not both")
        if req.protocol == "http":
            raise InvalidInput("HTTP exports listen on TCP: use --listen, not --unix")
        check_socket_path(ctx, req.unix)
    if req.protocol == "http" and req.tls != "none":
        raise InvalidInput("HTTP exports are plain HTTP: use --tls none, or NBD for TLS")
    with ctx.exports_lock:
        with ctx.db.session() as s:
            if req.name is not None and s.scalar(select(Export).where(Export.name == req.name)):
                raise Conflict(f"export name {req.name!r} is taken")
            if req.unix is None:
                if port is None:
                    port = free_port(host)
                else:
                    owner = s.scalar(select(Export).where(Export.port == port))
                    if owner is not None:
                        raise Conflict(f"port {port} belongs to export {owner.name!r}")
                check_port_free(host, port)
            elif s.scalar(select(Export).where(Export.socket == req.unix)):
                raise Conflict(f"{req.unix} belongs to another export")
            export_id = new_id()
            record = Export(
                id=export_id,
                engine=ctx.engine_name,
                name=req.name
                or default_name(s, f"{req.vm}-{req.disk or 'vda'}" if req.vm else image),
                image=image,
                format=fmt,
                virtual_size=size,
                protocol=req.protocol,
                host=None if req.unix else host,
                port=None if req.unix else port,
                socket=req.unix,
                tls=req.tls,
                tls_dir=req.tls_dir,
                shared=req.shared,
                vm_id=vm_id,
                disk=(req.disk or "vda") if vm_id else None,
                snapshot_path=f"{image}.exposed-{export_id[:8]}" if vm_id else None,
                phase="creating",
            )
            s.add(record)
        if vm_id is not None:
            ctx.exports_held[record.id] = hold.pop_all()
        try:
            root(ctx).mkdir(mode=0o700, exist_ok=True)
            export_dir(ctx, record.id).mkdir(mode=0o700)
            if record.vm_id is not None:
                freeze(ctx, record)
                crash_point("expose-frozen")
            make_credentials(ctx, record)
            pid = start(ctx, record)
            crash_point("expose-started")
            with ctx.db.session() as s:
                e = s.get(Export, record.id)
                assert e is not None
                e.pid, e.phase = pid, "ready"
        except BaseException as err:
            log.info("export of %s failed, undoing: %s", image, err)
            destroy(ctx, record.id)
            if isinstance(err, CommandFailed):
                raise BackendError(f"cannot make TLS credentials: {err}") from err
            raise
    log.info("exported %s as %s (pid %d)", image, record.name, pid)
    return get(ctx, record.id)


def remove(ctx: EngineContext, ref: str) -> None:
    """Stop the export's server and delete everything it owned."""
    with ctx.db.session() as s:
        e = find(s, ref)
        if not mine(ctx, e):
            raise Conflict(
                f"export {e.name} is served by the engine at {e.engine}: remove it there"
            )
        export_id = e.id
    with ctx.exports_lock:
        destroy(ctx, export_id)


def release(ctx: EngineContext, urls: set[str]) -> list[str]:
    """Stop this engine's exports of `urls` that no external disk reads any more
    (an import has made them local). Returns the ids stopped."""
    with ctx.db.session() as s:
        in_use = {d.external_url for d in s.scalars(select(Disk)) if d.external_url}
        unused = [
            e.id
            for e in s.scalars(select(Export))
            if e.vm_id is None and mine(ctx, e) and url(ctx, e) in urls - in_use
        ]
    for export_id in unused:
        log.info("import done: stopping export %s, which nothing reads any more", export_id)
        remove(ctx, export_id)
    return unused
