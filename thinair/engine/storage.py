"""Storage domains: named directories where thinair keeps its volumes."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from thinair import models
from thinair.db import refs
from thinair.db.models import Disk, Host, StorageDomain
from thinair.engine.context import EngineContext
from thinair.errors import Conflict, InvalidInput, StorageError
from thinair.external import ExternalURL, inside, parse_url


def _unreachable_parent(path: Path) -> Path | None:
    """The first directory on the way to `path` that other users cannot enter.
    QEMU runs as its own user under qemu:///system and must reach the volumes."""
    for parent in [*reversed(path.parents), path]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            return parent
    return None


def add(ctx: EngineContext, req: models.StorageDomainCreate) -> models.StorageDomain:
    path = Path(req.path)
    if not path.is_absolute():
        raise InvalidInput(f"storage domain path must be absolute, not {req.path!r}")
    path = Path(os.path.normpath(path))
    # A storage domain widens where the engine reads from, so it must lie under
    # THINAIR_IMAGE_ROOTS itself: else a domain at / would let any path in.
    check_image_root(ctx, str(path), "storage domain path", domains=False)
    if not path.is_dir():
        raise InvalidInput(f"{path} is not an existing directory")
    if not os.access(path, os.W_OK | os.X_OK) or path.parts[1:2] in (("proc",), ("sys",)):
        raise InvalidInput(f"{path} is not writable by the engine")
    with ctx.db.session() as s:
        # As hosts.find does (hosts sits above this module: it checks paths here).
        host_id = None
        if req.host is not None:
            host_id = refs.find(s, Host, req.host, "host", list_existing=True).id
    if ctx.settings.libvirt_uri.endswith("/system"):
        closed = _unreachable_parent(path)
        if closed is not None:
            raise InvalidInput(
                f"{path} is not reachable by QEMU's user: {closed} is not searchable by "
                "others (chmod o+x it, or pick another directory)"
            )
    with ctx.db.session() as s:
        if s.scalar(select(StorageDomain).where(StorageDomain.name == req.name)):
            raise Conflict(f"storage domain {req.name!r} exists already")
        for other in s.scalars(select(StorageDomain)):
            other_path = Path(other.path)
            if path == other_path or other_path in path.parents or path in other_path.parents:
                raise Conflict(f"{path} overlaps storage domain {other.name!r} at {other.path}")
        sd = StorageDomain(name=req.name, path=str(path), host_id=host_id)
        s.add(sd)
        s.flush()
        return to_model(sd)


def image_roots(ctx: EngineContext, domains: bool = True) -> list[Path]:
    """Where the engine reads local files from: THINAIR_IMAGE_ROOTS (and
    THINAIR_HOME/images), and the storage domains unless `domains` is False."""
    roots = [Path(os.path.realpath(r)) for r in ctx.settings.image_root_paths]
    if domains:
        with ctx.db.session() as s:
            roots += [Path(os.path.realpath(p)) for p in s.scalars(select(StorageDomain.path))]
    return roots


def check_image_root(
    ctx: EngineContext, path: str, what: str = "image", domains: bool = True
) -> None:
    """Refuse a local path outside the image roots and the storage domains. The
    path is resolved first, so neither ".." nor a symlink gets out. Nothing in
    THINAIR_HOME is let in but its images/ and exports/ (the engine's own
    exports' keys). The answer
    for a path outside is the same whether it exists or not, and nothing there
    is opened, so the refusal tells nothing about the host's files."""
    home = Path(os.path.realpath(ctx.settings.home))
    if inside(path, [home]) and not inside(path, [home / "images", home / "exports"]):
        # Its token, database and keys, should THINAIR_IMAGE_ROOTS cover it.
        raise InvalidInput(
            f"{what} {path} is in THINAIR_HOME ({home}), which holds the engine's own "
            "token, database and keys; only its images/ and exports/ may be named"
        )
    roots = image_roots(ctx, domains)
    if not inside(path, roots):
        shown = ", ".join(str(r) for r in roots)
        raise InvalidInput(
            f"{what} {path} is outside the directories the engine serves from ({shown}); "
            "move it there or add its directory to THINAIR_IMAGE_ROOTS"
        )


def check_location(ctx: EngineContext, text: str, what: str = "disk image") -> ExternalURL:
    """The one check for every URL or path a client names (VM disks, probe,
    OVA, backups): its syntax, then every local file it makes the engine open
    (the image, the tar holding it, a TLS key or certificate directory, a Unix
    socket) against the image roots."""
    ext = parse_url(text)
    for path in ext.local_files:
        check_image_root(ctx, path, what if path == ext.url else "file")
    return ext


def to_model(sd: StorageDomain) -> models.StorageDomain:
    total: int | None
    free: int | None
    try:
        usage = shutil.disk_usage(sd.path)
        total, free, available = usage.total, usage.free, True
    except OSError:
        total = free = None
        available = False
    return models.StorageDomain(
        id=sd.id,
        name=sd.name,
        path=sd.path,
        total_bytes=total,
        free_bytes=free,
        available=available,
        created_at=sd.created_at,
        host=sd.host.name if sd.host else None,
        shared=sd.host_id is None,
    )


def find(s: Session, ref: str) -> StorageDomain:
    """By name, id or a unique prefix of its id; a missing one names those there are."""
    return refs.find(s, StorageDomain, ref, "storage domain", list_existing=True)


def list_all(ctx: EngineContext) -> list[models.StorageDomain]:
    with ctx.db.session() as s:
        return [
            to_model(sd) for sd in s.scalars(select(StorageDomain).order_by(StorageDomain.name))
        ]


def get(ctx: EngineContext, ref: str) -> models.StorageDomain:
    with ctx.db.session() as s:
        sd = find(s, ref)
        return to_model(sd)


def remove(ctx: EngineContext, ref: str) -> None:
    with ctx.db.session() as s:
        sd = find(s, ref)
        used = s.scalar(select(Disk).where(Disk.storage_domain_id == sd.id).limit(1))
        if used is not None:
            raise Conflict(f"storage domain {sd.name!r} holds volumes of VM {used.vm.name!r}")
        s.delete(sd)


def check_space(ctx: EngineContext, sd: StorageDomain, needed: int = 0) -> None:
    """Refuse a storage domain that is gone or has too little free space."""
    try:
        free = shutil.disk_usage(sd.path).free
    except OSError as e:
        raise StorageError(f"storage domain {sd.name!r} at {sd.path} is not available: {e}") from e
    if not os.access(sd.path, os.W_OK):
        raise StorageError(f"storage domain {sd.name!r} at {sd.path} is not writable")
    wanted = needed + ctx.settings.min_free_mib * 1024 * 1024
    if free < wanted:
        raise StorageError(
            f"storage domain {sd.name!r} is full: {free // 2**20} MiB free, "
            f"{wanted // 2**20} MiB needed"
        )
