"""Events: what changed in the engine, pushed to clients that follow it live
(`GET /api/v1/events`, server-sent events): VM states as libvirt reports them,
VMs created, started, imported or removed, and every change of a job.

An event says what changed, not the whole state: a client reads the state once
when it (re)connects, then follows the events. Publishers are threads (libvirt's
event loop, jobs, requests); each subscriber is an asyncio queue on the API's
event loop. A subscriber too slow to keep up loses its queue and gets one
`resync` event instead: read everything again.

Every event has an id (this engine run's, then a counter) and the last
REPLAYED are kept, so a client that reconnects with the last id it saw
(`Last-Event-ID`, as EventSource sends it) gets what it missed; one whose id is
older than that, or from another run of the engine, gets `resync`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

QUEUE_SIZE = 1000
REPLAYED = 1000


@dataclass(frozen=True)
class Event:
    kind: str  # vm, job, resync
    data: dict[str, Any]
    id: str = ""  # RUN:SEQ
    seq: int = 0


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
        self._run = f"{time.time_ns():x}"
        self._count = 0
        self._recent: collections.deque[Event] = collections.deque(maxlen=REPLAYED)

    def subscribe(
        self, loop: asyncio.AbstractEventLoop, last_event_id: str | None = None
    ) -> Subscription:
        """A new subscriber; with `last_event_id`, the events after that one come
        first (or `resync`, when they are not all kept any more)."""
        sub = Subscription(loop)
        with self._lock:
            self._subscribers.add(sub)
            if last_event_id:
                missed = self._since(last_event_id)
                for event in missed if missed is not None else [Event("resync", {})]:
                    sub._queue.put_nowait(event)
        return sub

    def _since(self, last_event_id: str) -> list[Event] | None:
        run, _, count = last_event_id.partition(":")
        if run != self._run or not count.isdigit() or int(count) > self._count:
            return None
        seen = int(count)
        oldest_kept = self._count - len(self._recent) + 1
        if seen + 1 < oldest_kept:
            return None  # some it missed are no longer kept
        return [e for e in self._recent if e.seq > seen]

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        with self._lock:
            self._count += 1
            event = Event(kind, data, f"{self._run}:{self._count}", self._count)
            self._recent.append(event)
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
