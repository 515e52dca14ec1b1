"""libnbd: ask an NBD server about an export (size, read-only flag) with a deadline.

libnbd's blocking connect has no timeout; the asynchronous one polled against a
deadline gives a clear "did not answer" instead of a hang when a server is
firewalled or, like qemu-nbd without --shared, busy with another client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

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
