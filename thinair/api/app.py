"""The REST API: routes map onto the engine's flows; errors become JSON bodies
with a stable `code` and a `message`, and HTTP statuses are chosen here."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Response
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter
from sqlalchemy.engine import make_url
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from thinair import models, web
from thinair.api import audit, auth, console, hosts, metrics, security, tokens
from thinair.api.deps import ERRORS, AuthError, Ctx, authenticated, install_error_handlers
from thinair.config import Settings
from thinair.db.models import ApiToken
from thinair.engine import exports, imports, reconcile, storage, vms
from thinair.engine.build import build
from thinair.engine.jobs import JobRunner
from thinair.engine.outages import OutageWatcher
from thinair.engine.readahead import Readahead
from thinair.errors import NotFound
from thinair.version import __version__

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", dependencies=[Depends(authenticated)], responses=ERRORS)


@router.get("/storage_domains", response_model=list[models.StorageDomain])
def list_storage_domains(ctx: Ctx) -> list[models.StorageDomain]:
    return storage.list_all(ctx)


@router.post("/storage_domains", response_model=models.StorageDomain, status_code=201)
def add_storage_domain(ctx: Ctx, req: models.StorageDomainCreate) -> models.StorageDomain:
    return storage.add(ctx, req)


@router.get("/storage_domains/{ref}", response_model=models.StorageDomain)
def get_storage_domain(ctx: Ctx, ref: str) -> models.StorageDomain:
    return storage.get(ctx, ref)


@router.delete("/storage_domains/{ref}", status_code=204)
def remove_storage_domain(ctx: Ctx, ref: str) -> Response:
    storage.remove(ctx, ref)
    return Response(status_code=204)


@router.get("/vms", response_model=list[models.Vm])
def list_vms(
    ctx: Ctx,
    limit: Annotated[
        int | None, Query(ge=1, le=MAX_PAGE, description="at most this many (a page)")
    ] = None,
    after: Annotated[
        str | None,
        Query(max_length=64, description="from the first VM whose name sorts after this"),
    ] = None,
) -> Response:
    """The VMs by name; with `limit`, a page of them: the next page starts
    `after` the last name of this one (the `Link: <...>; rel="next"` header
    says so while a page comes back full)."""
    page = vms.list_rows(ctx, limit, after)
    headers = {}
    if limit is not None and len(page) == limit:
        last = quote(page[-1]["name"])
        headers["Link"] = f'</api/v1/vms?limit={limit}&after={last}>; rel="next"'
    # Straight to JSON: models.Vm's shape (tests/unit/test_api.py holds it to GET
    # /vms/{ref}), without building a model per VM and disk and validating twice.
    return Response(_ROWS.dump_json(page), media_type="application/json", headers=headers)


MAX_PAGE = 1000
_ROWS = TypeAdapter(list[dict[str, Any]])


@router.post("/vms", response_model=models.Vm, status_code=201)
def create_vm(ctx: Ctx, req: models.VmCreate) -> models.Vm:
    return vms.create(ctx, req)


@router.get("/vms/{ref}", response_model=models.Vm)
def get_vm(ctx: Ctx, ref: str) -> models.Vm:
    return vms.get(ctx, ref)


@router.delete("/vms/{ref}", status_code=204)
def remove_vm(ctx: Ctx, ref: str, force: bool = False) -> Response:
    vms.remove(ctx, ref, force=force)
    return Response(status_code=204)


@router.get("/vms/{ref}/disks", response_model=list[models.Disk])
def list_vm_disks(ctx: Ctx, ref: str) -> list[models.Disk]:
    return vms.get(ctx, ref).disks


@router.post("/vms/{ref}/start", response_model=models.Vm)
def start_vm(ctx: Ctx, ref: str, req: models.VmStart | None = None) -> models.Vm:
    return vms.start(ctx, ref, (req or models.VmStart()).host)


@router.post("/vms/{ref}/stop", response_model=models.Vm)
def stop_vm(ctx: Ctx, ref: str, req: models.VmStop | None = None) -> models.Vm:
    return vms.stop(ctx, ref, req or models.VmStop())


@router.post("/vms/{ref}/rollback", status_code=204)
def rollback_vm(ctx: Ctx, ref: str) -> Response:
    vms.rollback(ctx, ref)
    return Response(status_code=204)


@router.get("/vms/{ref}/console", response_model=models.Console)
async def vm_console(
    ctx: Ctx,
    token: Annotated[ApiToken, Depends(authenticated)],
    ref: str,
    offset: Annotated[int, Query(ge=0)] = 0,
    wait: Annotated[
        float, Query(ge=0, le=60, description="long-poll: wait up to this long for new output")
    ] = 0,
) -> models.Console:
    """The serial console from `offset` on; with `wait`, once there is something
    past `offset` (or the wait ran out)."""
    path = await run_in_threadpool(vms.console_path, ctx, ref)
    if wait:
        with security.CONSOLE_WAITS.hold(token.id):

            def grown() -> bool:
                return _console_size(path) != offset

            if not await security.wait_while_live(ctx, token.id, grown, wait, CONSOLE_POLL):
                raise AuthError("token revoked")
    return await run_in_threadpool(vms.console, ctx, ref, offset)


CONSOLE_POLL = 0.2


def _console_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


@router.get(
    "/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "an event stream"}},
)
async def events(
    ctx: Ctx,
    token: Annotated[ApiToken, Depends(authenticated)],
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    """Server-sent events, until the client goes: `vm` (id, name, and the state
    when libvirt reports one) when a VM is created, removed, started, imported
    or changes state; `job` (the whole job) on every change of a job; `resync`
    when the client fell behind and should read everything again. The first
    event, `hello`, says the stream is open: read the state then. Each event has
    an id: reconnecting with `Last-Event-ID` replays what was missed (or sends
    `resync`). A token revoked while its stream is open ends the stream, with
    an `unauthorized` event. A token has at most a few streams open (429 past
    that)."""
    security.EVENT_STREAMS.check(token.id)

    async def stream() -> AsyncIterator[ServerSentEvent]:
        # Held here, not in the handler: a generator that never starts never
        # runs its finally, and the count would leak.
        with security.EVENT_STREAMS.hold(token.id):
            sub = ctx.events.subscribe(asyncio.get_running_loop(), last_event_id)
            try:
                yield ServerSentEvent(event="hello", data="{}")
                while True:
                    try:
                        event = await asyncio.wait_for(sub.get(), EVENTS_RECHECK)
                    except TimeoutError:
                        event = None
                    if not await run_in_threadpool(auth.is_live, ctx, token.id):
                        message = f"token {token.name!r} was revoked"
                        data = json.dumps({"code": "unauthorized", "message": message})
                        yield ServerSentEvent(event="unauthorized", data=data)
                        return
                    if event is not None:
                        data = json.dumps(event.data)
                        yield ServerSentEvent(event=event.kind, data=data, id=event.id or None)
            finally:
                ctx.events.unsubscribe(sub)

    return EventSourceResponse(stream(), ping=EVENTS_PING)


EVENTS_PING = 15
# How often an open stream checks that its token still holds (and on every event).
EVENTS_RECHECK = 5.0


@router.post("/probe", response_model=models.ProbeResult)
def probe_disk(ctx: Ctx, req: models.ProbeRequest) -> models.ProbeResult:
    """Check an external disk (reachable? format? size?) before creating a VM on it."""
    return vms.probe_disk(ctx, req)


@router.get("/exports", response_model=list[models.Export])
def list_exports(ctx: Ctx) -> list[models.Export]:
    return exports.list_all(ctx)


@router.post("/exports", response_model=models.Export, status_code=201)
def create_export(ctx: Ctx, req: models.ExportCreate) -> models.Export:
    """Serve an image read-only over NBD (optionally TLS) or HTTP, until removed."""
    return exports.create(ctx, req)


@router.get("/exports/{ref}", response_model=models.Export)
def get_export(ctx: Ctx, ref: str) -> models.Export:
    return exports.get(ctx, ref)


@router.delete("/exports/{ref}", status_code=204)
def remove_export(ctx: Ctx, ref: str) -> Response:
    exports.remove(ctx, ref)
    return Response(status_code=204)


def get_jobs(ctx: Ctx) -> JobRunner:
    return ctx.jobs


Jobs = Annotated[JobRunner, Depends(get_jobs)]


def _accepted(job: models.Job) -> JSONResponse:
    return JSONResponse(
        status_code=202,
        content=job.model_dump(mode="json"),
        headers={"Location": f"/api/v1/jobs/{job.id}"},
    )


@router.post("/vms/{ref}/import", response_model=models.Job, status_code=202)
def import_vm(ctx: Ctx, jobs: Jobs, ref: str, req: models.ImportRequest) -> JSONResponse:
    """Make every external disk of the VM local; returns the job at once."""
    return _accepted(imports.start(ctx, jobs, ref, req))


@router.get("/disks", response_model=list[models.Disk])
def list_disks(ctx: Ctx) -> list[models.Disk]:
    return [d for vm in vms.list_all(ctx) for d in vm.disks]


@router.get("/disks/{disk_id}", response_model=models.Disk)
def get_disk(ctx: Ctx, disk_id: str) -> models.Disk:
    return vms.get_disk(ctx, disk_id)


@router.post("/disks/{disk_id}/move", response_model=models.Job, status_code=202)
def move_disk(ctx: Ctx, jobs: Jobs, disk_id: str, req: models.ImportRequest) -> JSONResponse:
    """Make one disk local (oVirt's "move"); returns the job at once."""
    vm_id = get_disk(ctx, disk_id).vm_id
    return _accepted(imports.start(ctx, jobs, vm_id, req, only_disk=disk_id))


@router.get("/jobs", response_model=list[models.Job])
def list_jobs(ctx: Ctx, jobs: Jobs, vm: str | None = None) -> list[models.Job]:
    """`vm`: its name, id or id prefix; the id of a VM removed since keeps its jobs."""
    if vm:
        with contextlib.suppress(NotFound):
            vm = vms.get(ctx, vm).id
    return jobs.list(vm_id=vm)


@router.get("/jobs/{job_id}", response_model=models.Job)
def get_job(
    jobs: Jobs,
    job_id: str,
    wait: Annotated[float, Query(ge=0, le=60, description="long-poll up to this long")] = 0,
    since: Annotated[datetime | None, Query(description="return once updated after this")] = None,
) -> models.Job:
    if wait:
        return jobs.wait_change(job_id, since, wait)
    return jobs.get(job_id)


@router.post("/jobs/{job_id}/cancel", response_model=models.Job)
def cancel_job(jobs: Jobs, job_id: str) -> models.Job:
    return jobs.cancel(job_id)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.load()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx = build(settings)
        ctx.migrate()
        auth.ensure_admin_token(ctx)
        reconcile.reconcile(ctx)
        runner = ctx.jobs
        runner.resume_all()
        runner.start_polling()
        ctx.outages = OutageWatcher(ctx)
        ctx.outages.start()
        # The followers also keep each bridge's cache within its limit (the
        # cow filter drops nothing), so they run with the readahead and the
        # prefetch off too.
        readahead = Readahead(ctx) if settings.bridge_cache else None
        if readahead is not None:
            readahead.start()
        app.state.ctx = ctx
        # What start-up made lives as long as the engine: out of the collector's
        # way, a full collection walks only what requests make (a listing of
        # 1,000 VMs had a 50 ms pause of it now and then).
        gc.freeze()
        log.info(
            "engine ready at %s (libvirt %s, database %s)",
            settings.listen,
            settings.libvirt_uri,
            make_url(settings.db_url).render_as_string(hide_password=True),
        )
        yield
        if readahead is not None:
            readahead.stop()
        ctx.outages.stop()
        runner.stop_polling()
        ctx.close()

    app = FastAPI(
        title="thinair",
        version=__version__,
        description="Run virtual machines out of thin air.",
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.add_middleware(audit.AuditTrail)
    security.install(app)
    app.include_router(router)
    app.include_router(audit.router)
    app.include_router(tokens.router)
    app.include_router(hosts.router)
    app.include_router(metrics.router)  # GET /metrics, for Prometheus
    app.include_router(console.router)
    web.mount(app)

    @app.get(
        "/api/v1/health",
        response_model=models.Health,
        tags=["health"],
        dependencies=[Depends(authenticated)],
        responses=ERRORS,
    )
    def health() -> models.Health:
        return models.Health(status="ok", version=__version__, libvirt_uri=settings.libvirt_uri)

    install_error_handlers(app)

    return app
