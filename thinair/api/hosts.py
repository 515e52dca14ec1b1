"""Host routes: the libvirt hosts VMs run on (the local one, and those added)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from thinair import models
from thinair.api.deps import ERRORS, Ctx, authenticated
from thinair.engine import hosts

router = APIRouter(
    prefix="/api/v1/hosts", dependencies=[Depends(authenticated)], responses=ERRORS, tags=["hosts"]
)


@router.get("", response_model=list[models.Host])
def list_hosts(ctx: Ctx) -> list[models.Host]:
    return hosts.list_all(ctx)


@router.post("", response_model=models.Host, status_code=201)
def add_host(ctx: Ctx, req: models.HostCreate) -> models.Host:
    return hosts.add(ctx, req)


@router.get("/{name}", response_model=models.Host)
def get_host(ctx: Ctx, name: str) -> models.Host:
    return hosts.get(ctx, name)


@router.delete("/{name}", status_code=204)
def remove_host(ctx: Ctx, name: str) -> Response:
    hosts.remove(ctx, name)
    return Response(status_code=204)
