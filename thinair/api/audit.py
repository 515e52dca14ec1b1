"""The audit trail: every request that asks for a change (any method but GET,
HEAD and OPTIONS under /api/v1) is recorded once answered, with the time, the
token's name, the client's address, the action (the route's name: create_vm,
start_vm, revoke_token, ...), its target and the outcome, as oVirt's audit
log and Proxmox's task log with its user column. Refusals are recorded too:
a bad token, a read-only token, a path outside the image roots. Admin tokens
read it (GET /api/v1/audit, `thinair audit`, the UI's Audit view)."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from thinair import models
from thinair.api.deps import ERRORS, Ctx, admin_only
from thinair.db.models import AuditEntry, aware
from thinair.engine.context import EngineContext

log = logging.getLogger(__name__)

READS = frozenset({"GET", "HEAD", "OPTIONS"})
# Body fields that name what a create is about, in this order of preference.
TARGET_FIELDS = ("name", "image", "vm", "url", "ova", "path")
MESSAGE_BYTES = 4096  # of an error answer kept to find its message


def _outcome(status: int) -> str:
    return "ok" if status < 400 else "refused" if status < 500 else "failed"


def _target(scope: Scope, body: bytes) -> str | None:
    params = scope.get("path_params") or {}
    if params:
        return ",".join(str(v) for v in params.values())[:512]
    try:
        data = json.loads(body) if body else None
    except (ValueError, RecursionError):  # not JSON, or nested 10000 deep
        return None
    if isinstance(data, dict):
        for key in TARGET_FIELDS:
            if isinstance(data.get(key), str):
                return str(data[key])[:512]
    return None


def _message(status: int, body: bytes) -> str | None:
    if status < 400:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return body[:500].decode(errors="replace") or None
    return str(data.get("message"))[:2000] if isinstance(data, dict) else None


def scope_line(scope: Scope) -> tuple[str, str]:
    return scope["method"], scope["path"]


def record(ctx: EngineContext, entry: AuditEntry) -> None:
    with ctx.db.session() as s:
        s.add(entry)


class AuditTrail:
    """ASGI middleware: records each change as its answer ends. The
    route's `authenticated` dependency leaves the token's name in the request's
    state; the body (already capped at 1 MiB) is kept to name the target."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in READS
            or not scope["path"].startswith("/api/v1/")
        ):
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})
        body = bytearray()
        answer = bytearray()
        status = 500

        async def keep_body() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                body.extend(message.get("body", b""))
            return message

        recorded = False

        async def keep_status(message: Message) -> None:
            nonlocal status, recorded
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                if len(answer) < MESSAGE_BYTES:
                    answer.extend(message.get("body", b"")[:MESSAGE_BYTES])
                if not message.get("more_body", False) and not recorded:
                    # Before the answer ends: a client that has it finds it logged.
                    recorded = True
                    await self._record(scope, status, bytes(body), bytes(answer))
            await send(message)

        try:
            await self.app(scope, keep_body, keep_status)
        finally:
            if not recorded:
                await self._record(scope, status, bytes(body), bytes(answer))

    async def _record(self, scope: Scope, status: int, body: bytes, answer: bytes) -> None:
        try:
            await self._write(scope, status, body, answer)
        except Exception:  # the answer goes out whatever happens here
            log.exception("could not record %s %s in the audit log", *scope_line(scope))

    async def _write(self, scope: Scope, status: int, body: bytes, answer: bytes) -> None:
        ctx: EngineContext | None = getattr(scope["app"].state, "ctx", None)
        if ctx is None:
            return
        route = scope.get("route")
        client = scope.get("client")
        entry = AuditEntry(
            token=scope["state"].get("token_name"),
            client=client[0][:64] if client else None,
            method=scope["method"][:8],
            path=scope["path"][:512],
            action=(getattr(route, "name", None) or "unknown")[:64],
            target=_target(scope, body),
            status=status,
            outcome=_outcome(status),
            message=_message(status, answer),
        )
        await run_in_threadpool(record, ctx, entry)


router = APIRouter(
    prefix="/api/v1/audit",
    dependencies=[Depends(admin_only)],
    responses=ERRORS,
    tags=["audit"],
)


@router.get("", response_model=list[models.AuditEntry])
def list_audit(
    ctx: Ctx,
    limit: Annotated[int, Query(ge=1, le=10000)] = 100,
    token: Annotated[str | None, Query(max_length=64, description="only this token's")] = None,
    action: Annotated[str | None, Query(max_length=64, description="only this action")] = None,
) -> list[models.AuditEntry]:
    """The newest entries first."""
    query: Any = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if token is not None:
        query = query.where(AuditEntry.token == token)
    if action is not None:
        query = query.where(AuditEntry.action == action)
    with ctx.db.session() as s:
        return [
            models.AuditEntry(
                id=e.id,
                at=aware(e.at),
                token=e.token,
                client=e.client,
                method=e.method,
                path=e.path,
                action=e.action,
                target=e.target,
                status=e.status,
                outcome=e.outcome,
                message=e.message,
            )
            for e in s.scalars(query)
        ]
