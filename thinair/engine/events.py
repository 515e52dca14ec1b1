"""Events: what changed in the engine, pushed to clients that follow it live
(`GET /api/v1/events`, server-sent events): VM states as libvirt reports them,
VMs created, started, imported or removed, and every change of a job.

An event says what changed, not the whole state: a client reads the state once
when it (re)connects, then follows the events. Publishers are threads (libvirt's
event loop, jobs, requests); each subscriber is an asyncio queue on the API's
event loop. A subscriber too slow to keep up loses its queue and gets one
`resync` event instead: read everything again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

QUEUE_SIZE = 1000


@dataclass(frozen=True)
class Event:
    kind: str  # vm, job, resync
    data: dict[str, Any]


class Subscription:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE_SIZE)

    def put(self, event: Event) -> None:
        """From any thread."""
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens
            self._loop.call_soon_threadsafe(self._put, event)

    def _put(self, event: Event) -> None:
        if self._queue.full():
            while not self._queue.empty():
                self._queue.get_nowait()
            event = Event("resync", {})
        self._queue.put_nowait(event)

    async def get(self) -> Event:
        return await self._queue.get()


class EventHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: set[Subscription] = set()

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> Subscription:
        sub = Subscription(loop)
        with self._lock:
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        event = Event(kind, data)
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            sub.put(event)

    def vm_changed(
        self, vm_id: str, name: str, state: str | None = None, reason: str | None = None
    ) -> None:
        """A VM was created, removed, started, imported... or libvirt says its
        domain changed state; `reason` says why, where the engine knows (a VM
        paused because its source does not answer, resumed when it does)."""
        data: dict[str, Any] = {"id": vm_id, "name": name}
        if state is not None:
            data["state"] = state
        if reason is not None:
            data["reason"] = reason
        self.publish("vm", data)
