"""Exports on engine start: finish or undo half-done flows, adopt live servers,
start dead ones again, stop what has no record."""

from __future__ import annotations

import re
import shutil
from contextlib import ExitStack

from sqlalchemy import select

from thinair.adapters import procfs
from thinair.db.models import Export
from thinair.engine.context import EngineContext
from thinair.engine.exports.servers import PROGRAMS, alive, destroy, mine, start, stop
from thinair.engine.exports.urls import root
from thinair.errors import BackendError, Conflict, ThinairError

_ID_IN_PATH = re.compile(r"/exports/([0-9a-f-]{36})/")


def reconcile(ctx: EngineContext) -> list[str]:
    """On engine start: finish or undo half-done flows, adopt live servers, start
    dead ones again on the same address, stop servers and delete directories that
    have no record. Returns what it did, one line per action."""
    actions: list[str] = []
    with ctx.db.session() as s:
        records = [e for e in s.scalars(select(Export)) if mine(ctx, e)]
    for e in records:
        if e.phase in ("creating", "removing"):
            try:
                destroy(ctx, e.id)
            except ThinairError as err:
                actions.append(f"could not finish removing export {e.name}: {err.message}")
                continue
            actions.append(
                f"{'undid export' if e.phase == 'creating' else 'removed export'} {e.name}"
            )
        else:
            if alive(ctx, e):
                actions.append(f"adopted export {e.name} (pid {e.pid})")
            else:
                _restart(ctx, e, actions)
            if e.vm_id is not None and e.id not in ctx.exports_held:
                # The VM is on the export's overlay still: keep other flows off it.
                hold = ExitStack()
                hold.enter_context(ctx.vm_busy(e.vm_id, f"an export of its disk {e.disk}"))
                ctx.exports_held[e.id] = hold
    with ctx.db.session() as s:
        kept = set(s.scalars(select(Export.id)))
    for pid, command in procfs.find(PROGRAMS, f"{root(ctx)}/").items():
        found = _ID_IN_PATH.search(command)
        if found and found.group(1) not in kept:
            procfs.terminate(pid, PROGRAMS, f"{root(ctx)}/{found.group(1)}/")
            actions.append(f"stopped export process {pid} that has no record")
    if root(ctx).is_dir():
        for directory in root(ctx).iterdir():
            if directory.name not in kept:
                shutil.rmtree(directory, ignore_errors=True)
                actions.append(f"deleted export directory {directory.name} that has no record")
    return actions


def _restart(ctx: EngineContext, e: Export, actions: list[str]) -> None:
    # A server left by an engine that died mid-start may hold the port.
    stop(ctx, e.id, None, e.protocol)
    try:
        pid = start(ctx, e)
    except (Conflict, BackendError) as err:
        with ctx.db.session() as s:
            record = s.get(Export, e.id)
            if record is not None:
                record.pid, record.error = None, err.message
        actions.append(f"could not start export {e.name} again: {err.message}")
        return
    with ctx.db.session() as s:
        record = s.get(Export, e.id)
        if record is not None:
            record.pid, record.error = pid, None
    actions.append(f"started export {e.name} again (pid {pid})")
