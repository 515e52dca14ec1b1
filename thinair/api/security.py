"""What every HTTP answer of the engine carries and what a request may take:
browser hardening headers (the UI keeps an admin token in sessionStorage, so
script injection would be a takeover), a cap on request bodies (plain ASGI
middleware, so streamed answers pass through untouched), and per-token bounds
on long requests (event streams, console long-polls), which end once their
token is revoked."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from thinair.api import auth
from thinair.engine.context import EngineContext

T = TypeVar("T")

MAX_BODY = 2**20  # bytes; the largest real request (26 disks) is a few KiB

# The UI is static files from this origin: no inline script, no framing,
# nothing fetched from elsewhere. Inline style is let in: xterm.js (the
# console's terminal) themes itself with <style> elements, and a style cannot
# run anything.
CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
# FastAPI's Swagger page loads its script and style from a CDN and starts it
# inline: it gets its own, looser policy, still never framed.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
    "frame-ancestors 'none'"
)
DOCS_PATH = "/api/v1/docs"

HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class SecurityHeaders:
    """Adds the hardening headers to every HTTP answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = DOCS_CSP if scope["path"].startswith(DOCS_PATH) else CSP

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in {name for name, _ in HEADERS}
                ]
                headers += [*HEADERS, (b"content-security-policy", csp.encode())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyTooLarge(HTTPException):
    """Raised from the body's reader: FastAPI passes an HTTPException through,
    and the API's handler answers it in the one error shape."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit // 2**20} MiB")


class BodyLimit:
    """Answers 413 to a request whose body is over MAX_BODY bytes, whether it
    says so in Content-Length or streams it chunked, before the app reads it all."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._refuse(send)
                return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {
                "code": "too_large",
                "message": f"request body over {self.limit // 2**20} MiB",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def install(app: Starlette) -> None:
    app.add_middleware(BodyLimit)
    app.add_middleware(SecurityHeaders)


class TooMany(HTTPException):
    def __init__(self, what: str, limit: int) -> None:
        super().__init__(
            429, f"this token has {limit} {what} open already; close one (another tab?) first"
        )


class PerToken:
    """How many long requests of one kind (event streams, console long-polls)
    each token has open, so that one client cannot tie up the engine."""

    def __init__(self, what: str, limit: int) -> None:
        self.what, self.limit = what, limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def check(self, token_id: str) -> None:
        """Raise TooMany if the token has all it may have open now."""
        with self._lock:
            if self._open.get(token_id, 0) >= self.limit:
                raise TooMany(self.what, self.limit)

    @contextmanager
    def hold(self, token_id: str) -> Iterator[None]:
        with self._lock:
            if self._open.get(token_id, 0) >= self.limit:
                raise TooMany(self.what, self.limit)
            self._open[token_id] = self._open.get(token_id, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._open[token_id] -= 1
                if not self._open[token_id]:
                    del self._open[token_id]

    def count(self, token_id: str) -> int:
        with self._lock:
            return self._open.get(token_id, 0)


EVENT_STREAMS = PerToken("event streams", 8)
CONSOLE_WAITS = PerToken("console long-polls", 8)
# How often an open event stream or console wait checks that its token is
# still live: a revoked token's stream ends within this.
RECHECK_SECONDS = 2.0


async def wait_while_live(
    ctx: EngineContext, token_id: str, done: Callable[[], bool], timeout: float, poll: float
) -> bool:
    """Poll `done()` until it holds or `timeout` runs out; False as soon as the
    token is found revoked."""
    deadline = time.monotonic() + timeout
    recheck = time.monotonic() + RECHECK_SECONDS
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(poll)
        if time.monotonic() > recheck:
            if not await run_in_threadpool(auth.is_live, ctx, token_id):
                return False
            recheck = time.monotonic() + RECHECK_SECONDS
    return True
