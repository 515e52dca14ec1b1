"""Host routes: the libvirt hosts the engine drives (for now the one it runs on)."""

from __future__ import annotations

import libvirt
from fastapi import APIRouter, Depends

from thinair import models
from thinair.api.app import ERRORS, Ctx, authenticated
from thinair.engine.context import EngineContext
from thinair.errors import BackendError, NotFound

router = APIRouter(
    prefix="/api/v1/hosts", dependencies=[Depends(authenticated)], responses=ERRORS, tags=["hosts"]
)

LOCAL = "local"


def _local(ctx: EngineContext) -> models.Host:
    conn = ctx.virt.conn
    try:
        _model, memory_mib, cpus, *_ = conn.getInfo()  # libvirt-python gives MiB
        version = conn.getVersion()
        free = conn.getFreeMemory()
    except libvirt.libvirtError as e:
        raise BackendError(f"libvirt: {e}") from None
    major, minor, micro = version // 1_000_000, version // 1000 % 1000, version % 1000
    return models.Host(
        name=LOCAL,
        libvirt_uri=ctx.settings.libvirt_uri,
        hypervisor=conn.getType(),
        hypervisor_version=f"{major}.{minor}.{micro}",
        cpus=cpus,
        memory_mib=memory_mib,
        free_memory_mib=free // 2**20,
        domain_type=ctx.domain_type,
    )


@router.get("", response_model=list[models.Host])
def list_hosts(ctx: Ctx) -> list[models.Host]:
    return [_local(ctx)]


@router.get("/{name}", response_model=models.Host)
def get_host(ctx: Ctx, name: str) -> models.Host:
    if name != LOCAL:
        raise NotFound(f"no host {name!r}")
    return _local(ctx)
