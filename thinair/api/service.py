"""Running the engine as a service: one engine per THINAIR_HOME, its port taken
before anything is touched, and systemd's readiness notification.

`thinair engine` takes the home's lock (an flock on THINAIR_HOME/engine.lock that
names the holder's pid and address), then binds its port, and only then lets
uvicorn run the app, whose start-up migrates the database, reconciles and resumes
jobs. A second engine on the same home stops at the lock with one line naming the
first and has changed nothing; an engine whose port is taken stops at the bind.
The kernel frees the lock when the process dies, however it dies; the export and
bridge servers the engine starts do not inherit it (Python's descriptors are not
inheritable), so a server that outlives the engine does not keep the home.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

import uvicorn

from thinair.config import Settings
from thinair.errors import Conflict, InvalidInput


class HomeInUse(Conflict):
    pass


class HomeLock:
    """THINAIR_HOME/engine.lock, held for the engine's lifetime."""

    def __init__(self, home: Path) -> None:
        self.path = home / "engine.lock"
        self._fd: int | None = None

    def acquire(self, address: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._read(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            pid = holder.get("pid", "?")
            where = holder.get("listen", "?")
            raise HomeInUse(
                f"THINAIR_HOME {self.path.parent} is in use by the engine pid {pid} "
                f"at {where}: stop it first, or give this one its own THINAIR_HOME"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"pid": os.getpid(), "listen": address}) + "\n").encode(), 0)
        self._fd = fd

    @staticmethod
    def _read(fd: int) -> dict[str, object]:
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(os.pread(fd, 4096, 0) or b"{}")
            if isinstance(data, dict):
                return data
        return {}

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def bind(settings: Settings) -> socket.socket:
    """The engine's listening socket, bound now (not after the app's start-up)."""
    host, port = settings.listen_host, settings.listen_port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InvalidInput(f"cannot listen on {settings.listen}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise Conflict(f"cannot listen on {settings.listen}: {e.strerror}") from None
    return sock


def notify(state: str) -> None:
    """Tell systemd (Type=notify) how the engine is; nothing outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.connect(address)
        sock.sendall(state.encode())


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:  # migrated, reconciled, jobs resumed, and serving
            notify("READY=1")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        notify("STOPPING=1")
        await super().shutdown(sockets=sockets)


def run(settings: Settings, log_level: str) -> None:
    """Take the home, then the port, then run the engine until it is stopped."""
    lock = HomeLock(settings.home)
    lock.acquire(settings.listen)
    try:
        sock = bind(settings)
        from thinair.api.app import create_app  # its imports log: only once we run

        config = uvicorn.Config(
            create_app(settings),
            ssl_certfile=settings.tls_cert,
            ssl_keyfile=settings.tls_key,
            log_level=log_level,
            access_log=log_level == "debug",
        )
        with sock:
            _Server(config).run(sockets=[sock])
    finally:
        lock.release()
