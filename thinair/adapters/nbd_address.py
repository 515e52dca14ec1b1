"""Where an NBD export is, as a value: a Unix socket or a host and TCP port, and
the export's name; `url()` gives the NBD URI (libnbd's and QEMU's syntax) for it.
Also the one way to find a free TCP port for a server to listen on.
"""

from __future__ import annotations

import socket as _socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

DEFAULT_PORT = 10809


@dataclass(frozen=True)
class NbdAddress:
    """An NBD export: on a Unix `socket`, or at `host`:`port`; named `export`."""

    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None
    export: str = ""

    def __post_init__(self) -> None:
        if (self.socket is None) == (self.host is None):
            raise ValueError("an NBD address is a Unix socket or a host, not both or neither")

    @classmethod
    def unix(cls, path: str, export: str = "") -> NbdAddress:
        return cls(socket=str(path), export=export)

    @classmethod
    def tcp(cls, host: str, port: int, export: str = "") -> NbdAddress:
        return cls(host=host, port=port, export=export)

    def url(
        self, tls: bool = False, user: str | None = None, query: Sequence[tuple[str, str]] = ()
    ) -> str:
        """nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH (nbds for
        TLS), with a TLS `user` and more query parameters (libnbd's tls-psk-file,
        ...) if given. Values are percent-encoded where they need it; names
        and paths of letters, digits, '-', '_', '.' and '/' stay as they are."""
        scheme = "nbds" if tls else "nbd"
        who = f"{quote(user, safe='')}@" if user else ""
        path = quote(self.export)
        params = list(query)
        if self.socket is not None:
            params.insert(0, ("socket", self.socket))
            address = f"{scheme}+unix://{who}/{path}"
        else:
            assert self.host is not None
            host = f"[{self.host}]" if ":" in self.host else self.host
            address = f"{scheme}://{who}{host}:{self.port}/{path}"
        if not params:
            return address
        return address + "?" + "&".join(f"{k}={quote(v)}" for k, v in params)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` now (the kernel's choice). OSError
    when `host` is not an address of this machine."""
    family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
    with _socket.socket(family, _socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
