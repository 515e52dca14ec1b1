"""The serial console over a WebSocket, both ways (the web UI's terminal):
`/api/v1/vms/{ref}/console/ws`. A browser cannot put a token in a WebSocket's
headers, so the first message is `{"token": "..."}`; typing is a change, so a
read-only token is refused. Then binary messages carry the console's bytes:
first the last CONSOLE_TAIL bytes of its log (what the guest printed before),
then libvirt's console stream (virDomainOpenConsole, as `virsh console`).

Close codes: 4401 bad token, 4403 read-only token, 4404 no such VM, 4409 not
running, 4502 libvirt refused."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool

from thinair.adapters.virt import Console, VirtError
from thinair.api import auth
from thinair.engine import vms
from thinair.engine.context import EngineContext
from thinair.errors import BackendError, NotFound

log = logging.getLogger(__name__)
router = APIRouter()

CONSOLE_TAIL = 16 * 1024
AUTH_TIMEOUT = 10.0


@router.websocket("/api/v1/vms/{ref}/console/ws")
async def console_ws(ws: WebSocket, ref: str) -> None:
    ctx: EngineContext = ws.app.state.ctx
    await ws.accept()
    try:
        hello = await asyncio.wait_for(ws.receive_json(), AUTH_TIMEOUT)
    except (TimeoutError, ValueError, WebSocketDisconnect):
        await _close(ws, 4401, 'send {"token": "..."} first')
        return
    token = await run_in_threadpool(auth.verify, ctx, str(hello.get("token") or ""))
    if token is None:
        await _close(ws, 4401, "invalid or revoked token")
        return
    if token.read_only:
        await _close(ws, 4403, f"token {token.name!r} is read-only: it cannot type")
        return
    try:
        vm = await run_in_threadpool(vms.get, ctx, ref)
    except NotFound as e:
        await _close(ws, 4404, e.message)
        return
    if vm.state != "running":
        await _close(ws, 4409, f"{vm.name} is {vm.state}: start it first")
        return
    try:
        stream = await run_in_threadpool(ctx.vm_virt(vm.name).open_console, vm.name)
    except BackendError as e:
        await _close(ws, 4502, e.message)
        return
    path = await run_in_threadpool(vms.console_path, ctx, vm.id)
    with contextlib.suppress(OSError):
        start = max(0, os.stat(path).st_size - CONSOLE_TAIL)
        past = await run_in_threadpool(vms.console, ctx, vm.id, start)
        if past.text:
            await ws.send_bytes(past.text.encode())
    await _relay(ws, stream)


async def _relay(ws: WebSocket, stream: Console) -> None:
    """Guest to browser in a thread (libvirt's stream blocks), browser to guest
    here, until either side ends."""
    loop = asyncio.get_running_loop()
    ended = asyncio.Event()

    def pump() -> None:
        try:
            while True:
                data = stream.recv(65536)
                if not data:
                    break
                asyncio.run_coroutine_threadsafe(ws.send_bytes(data), loop).result(30)
        except Exception as e:  # the stream was aborted, or the browser went
            log.debug("console stream ended: %s", e)
        finally:
            loop.call_soon_threadsafe(ended.set)

    threading.Thread(target=pump, name="console-ws", daemon=True).start()
    ending = asyncio.create_task(ended.wait())
    try:
        while not ended.is_set():
            receiving = asyncio.create_task(ws.receive())
            done, _ = await asyncio.wait({receiving, ending}, return_when=asyncio.FIRST_COMPLETED)
            if receiving not in done:
                receiving.cancel()
                break
            message = receiving.result()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("bytes") or (message.get("text") or "").encode()
            if data:
                await run_in_threadpool(stream.send, data)
    except (WebSocketDisconnect, VirtError):
        pass
    finally:
        ending.cancel()
        stream.abort()
        await _close(ws, 1000, "console closed")


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await ws.close(code=code, reason=reason)
