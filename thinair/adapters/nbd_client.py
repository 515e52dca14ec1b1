"""libnbd: ask an NBD server about an export (size, read-only flag) with a deadline;
read an export as a file; prefetch ranges of it.

libnbd's blocking connect has no timeout; the asynchronous one polled against a
deadline gives a clear "did not answer" instead of a hang when a server is
firewalled or, like qemu-nbd without --shared, busy with another client.
"""

from __future__ import annotations

import contextlib
import errno
import io
import time
from dataclasses import dataclass
from typing import IO

import nbd

from thinair.adapters.errors import AdapterError


class NBDProbeError(AdapterError):
    pass


@dataclass(frozen=True)
class ExportInfo:
    size: int
    read_only: bool


def connect(url: str, timeout: float, allocation_map: bool = False) -> nbd.NBD:
    """A handle connected to `url` within `timeout` seconds (NBDProbeError with
    the cause otherwise), asking for the allocation map if `allocation_map`.
    The handle and its socket are freed when it goes out of scope: libnbd 1.14's
    bindings have no close()."""
    h = nbd.NBD()
    # The one local file an NBD URL may name is the TLS key (or certificate
    # directory) the user gave for it.
    h.set_uri_allow_local_file("tls-psk-file=" in url or "tls-certificates=" in url)
    if allocation_map:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    deadline = time.monotonic() + timeout
    try:
        h.aio_connect_uri(url)
        while not h.aio_is_ready():
            if h.aio_is_dead() or h.aio_is_closed():
                raise NBDProbeError("connection closed by the server")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NBDProbeError(
                    f"no answer in {timeout:g} s (a server that serves one client at a "
                    "time, such as qemu-nbd without --shared, may be busy)"
                )
            h.poll(int(min(remaining, 0.5) * 1000))
    except nbd.Error as e:
        # "nbd_aio_connect_uri: connect: HOST: could not connect ...": drop the
        # function and phase names a user has no use for.
        message = e.string or str(e)
        for prefix in ("nbd_aio_connect_uri: ", "nbd_poll: ", "connect: ", "handshake: "):
            message = message.removeprefix(prefix)
        raise NBDProbeError(message, "nbd_connect_uri", e.string or str(e)) from e
    return h


def probe(url: str, timeout: float) -> ExportInfo:
    h = connect(url, timeout)
    try:
        info = ExportInfo(size=h.get_size(), read_only=bool(h.is_read_only()))
        h.shutdown()
    except nbd.Error as e:
        raise NBDProbeError(e.string or str(e)) from e
    return info


class _Reader(io.RawIOBase):
    """A seekable read-only file over an NBD export (for tarfile and the like)."""

    def __init__(self, handle: nbd.NBD) -> None:
        self._h = handle
        self._size = handle.get_size()
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(nbd.Error):
                self._h.shutdown()
        super().close()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._size - self._pos, 8 * 2**20)
        if n <= 0:
            return 0
        try:
            buffer[:n] = self._h.pread(n, self._pos)
        except nbd.Error as e:
            raise OSError(e.errnum or errno.EIO, e.string or str(e)) from e
        self._pos += n
        return n


def open_reader(url: str, timeout: float) -> IO[bytes]:
    """The export at `url` as a buffered, seekable, read-only file; closing it
    closes the connection. NBDProbeError when it cannot connect."""
    return io.BufferedReader(_Reader(connect(url, timeout)), buffer_size=64 * 1024)


def prefetch(url: str, ranges: list[tuple[int, int]], in_flight: int, timeout: float) -> None:
    """Read the (offset, length) `ranges` of the export at `url`, in that order,
    `in_flight` requests at a time, and drop the data: what a caching server
    (an NBD bridge) then holds. Reads, not NBD_CMD_CACHE: nbdkit 1.32's cache
    filter serves a cache request one block per round trip to its source, and a
    read of a run of missing blocks in one. Ranges past the end are cut.
    NBDProbeError on failure."""
    h = connect(url, timeout)
    try:
        size = h.get_size()
        pending = list(reversed(ranges))
        while pending or h.aio_in_flight() > 0:
            while pending and h.aio_in_flight() < in_flight:
                offset, length = pending.pop()
                length = min(length, size - offset)
                if length > 0:
                    h.aio_pread(nbd.Buffer(length), offset)
            h.poll(-1)
        h.shutdown()
    except nbd.Error as e:
        raise NBDProbeError(e.string or str(e)) from e
