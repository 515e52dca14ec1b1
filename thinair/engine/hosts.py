"""Hosts: the libvirt hosts VMs run on, and the choice of one for a VM.

The local host (the engine's THINAIR_LIBVIRT_URI) is always there. Others are
added by URI and reached through libvirt's own remote transports (ssh, TLS,
TCP). A storage domain is reached by one host, or by all (shared): a VM goes to
a host that reaches every storage domain of its disks and has the memory.
The engine itself creates and deletes the volumes, so a shared domain must be
mounted at the same path on the engine's machine too.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from thinair import models
from thinair.adapters.virt import Virt
from thinair.db import refs
from thinair.db.models import LOCAL_HOST, LOCAL_HOST_ID, Host, StorageDomain, Vm
from thinair.engine import storage
from thinair.engine.context import EngineContext
from thinair.errors import BackendError, Conflict, InvalidInput

# libvirt URIs a host may have: QEMU's drivers, local or through libvirt's remote
# transports; `test:` is libvirt's test driver (no hypervisor), for trying things out.
SCHEMES = ("qemu:", "qemu+ssh:", "qemu+tls:", "qemu+tcp:", "qemu+libssh2:", "qemu+libssh:", "test:")


# libvirt URI parameters a host may carry. Others are refused: `command=` and
# `netcat=` run programs, `socket=` connects to any local socket. A
# test:///FILE URI has libvirt parse FILE (and quote its first line back in an
# error): FILE is checked against the image roots like any other local file.
URI_PARAMS = frozenset(
    {"no_verify", "no_tty", "keyfile", "known_hosts", "known_hosts_verify", "sshauth"}
    | {"pkipath", "mode", "proxy", "tls_priority", "name"}
)


def check_uri(ctx: EngineContext, uri: str) -> None:
    parts = urlsplit(uri)
    if parts.scheme == "test" and uri != "test:///default":
        if parts.netloc or parts.query:
            raise InvalidInput(f"{uri!r}: the test driver takes test:///default or test:///FILE")
        storage.check_image_root(ctx, parts.path, "test driver file")
    for key in parse_qs(parts.query, keep_blank_values=True):
        if key not in URI_PARAMS:
            raise InvalidInput(
                f"{uri!r}: parameter {key!r} is not allowed in a host URI "
                f"(allowed: {', '.join(sorted(URI_PARAMS))})"
            )


def find(s: Session, ref: str) -> Host:
    """By name, id or a unique prefix of its id."""
    return refs.find(s, Host, ref, "host", list_existing=True)


def uri(ctx: EngineContext, host: Host) -> str:
    return host.libvirt_uri or ctx.settings.libvirt_uri


def _free_mib(virt: Virt) -> int:
    return virt.free_memory_mib()


def to_model(ctx: EngineContext, host: Host, vms: int = 0) -> models.Host:
    where = uri(ctx, host)
    model = models.Host(
        id=host.id,
        name=host.name,
        libvirt_uri=where,
        local=host.id == LOCAL_HOST_ID,
        vms=vms,
        hypervisor="",
        hypervisor_version="",
        cpus=0,
        memory_mib=0,
        free_memory_mib=0,
        domain_type="",
    )
    try:
        virt = ctx.virt_at(where)
        node = virt.node_info()
        model.hypervisor = node.hypervisor
        model.hypervisor_version = node.version
        model.cpus = node.cpus
        model.memory_mib, model.free_memory_mib = virt.memory_mib()
        model.domain_type = ctx.domain_type_on(virt)
    except BackendError as e:
        model.reachable, model.error = False, e.message
    return model


def _counts(s: Session) -> dict[str, int]:
    return {h: n for h, n in s.execute(select(Vm.host_id, func.count()).group_by(Vm.host_id))}


def list_all(ctx: EngineContext) -> list[models.Host]:
    with ctx.db.session() as s:
        counts = _counts(s)
        hosts = list(s.scalars(select(Host).order_by(Host.created_at, Host.name)))
        return [to_model(ctx, h, counts.get(h.id, 0)) for h in hosts]


def get(ctx: EngineContext, ref: str) -> models.Host:
    with ctx.db.session() as s:
        host = find(s, ref)
        return to_model(ctx, host, _counts(s).get(host.id, 0))


def add(ctx: EngineContext, req: models.HostCreate) -> models.Host:
    """Register a host after checking that libvirt answers there."""
    where = req.libvirt_uri.strip()
    if not where.startswith(SCHEMES) or "://" not in where:
        raise InvalidInput(
            f"{where!r} is not a libvirt URI thinair drives: use qemu+ssh://, qemu+tls://, "
            "qemu+tcp:// or qemu:///system"
        )
    check_uri(ctx, where)
    with ctx.db.session() as s:
        if s.scalar(select(Host).where(Host.name == req.name)):
            raise Conflict(f"host {req.name!r} exists already")
        if where == ctx.settings.libvirt_uri or s.scalar(
            select(Host).where(Host.libvirt_uri == where)
        ):
            raise Conflict(f"a host with URI {where} exists already")
    probe = Virt(where)
    try:
        probe.version()
    except BackendError as e:
        raise InvalidInput(f"libvirt at {where} does not answer: {e.message}") from e
    finally:
        probe.close()
    with ctx.db.session() as s:
        host = Host(name=req.name, libvirt_uri=where)
        s.add(host)
        s.flush()
        host_id = host.id
    return get(ctx, host_id)


def remove(ctx: EngineContext, ref: str) -> None:
    with ctx.db.session() as s:
        host = find(s, ref)
        if host.id == LOCAL_HOST_ID:
            raise Conflict("the local host cannot be removed")
        vm = s.scalar(select(Vm).where(Vm.host_id == host.id).limit(1))
        if vm is not None:
            raise Conflict(f"host {host.name!r} has VM {vm.name!r}: remove or move it first")
        sd = s.scalar(select(StorageDomain).where(StorageDomain.host_id == host.id).limit(1))
        if sd is not None:
            raise Conflict(f"storage domain {sd.name!r} is local to host {host.name!r}")
        s.delete(host)


def reaches(host: Host, domains: list[StorageDomain]) -> bool:
    return all(sd.host_id is None or sd.host_id == host.id for sd in domains)


def choose(
    ctx: EngineContext,
    s: Session,
    domains: list[StorageDomain],
    memory_mib: int,
    asked: str | None,
) -> Host:
    """The host for a VM: the one asked for, or the one with the most free memory
    among those that reach every storage domain of its disks."""
    if asked is not None:
        candidates = [find(s, asked)]
    else:
        candidates = list(s.scalars(select(Host).order_by(Host.created_at, Host.name)))
    why: list[str] = []
    fits: list[tuple[int, Host]] = []
    for host in candidates:
        if not reaches(host, domains):
            far = [sd.name for sd in domains if sd.host_id not in (None, host.id)]
            why.append(f"{host.name} does not reach storage domain {', '.join(sorted(set(far)))}")
            continue
        try:
            free = _free_mib(ctx.virt_at(uri(ctx, host)))
        except BackendError as e:
            why.append(f"{host.name} is unreachable ({e.message})")
            continue
        if free < memory_mib:
            why.append(f"{host.name} has {free} MiB free, {memory_mib} MiB needed")
            continue
        fits.append((free, host))
    if not fits:
        raise Conflict("no host can run this VM: " + "; ".join(why))
    # The most free memory; on a tie, the host added first (the local one).
    best = max(fits, key=lambda f: f[0])[0]
    return next(host for free, host in fits if free == best)


def name_of(s: Session, host_id: str | None) -> str:
    if host_id is None or host_id == LOCAL_HOST_ID:
        return LOCAL_HOST
    host = s.get(Host, host_id)
    return host.name if host else LOCAL_HOST
