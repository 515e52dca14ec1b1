"""qemu-nbd: serve an image read-only over NBD, as a child process we own, or
detached (an export that outlives the engine).

`Server.start()` waits until the export answers and cleans up if it never does;
`stop()` goes terminate -> timeout -> kill and logs what the server said.
`Server.start_detached()` lets qemu-nbd fork into its own session: its parent
exits only once the server listens (or with the reason it cannot), and the pid
file says which process to watch.
The binary can be overridden with THINAIR_QEMU_NBD.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from thinair.adapters._process import StartFailed, start_detached
from thinair.adapters.errors import AdapterError
from thinair.adapters.nbd_address import NbdAddress, free_port

__all__ = ["Server", "ServerError", "Tls", "free_port"]

log = logging.getLogger(__name__)


class ServerError(AdapterError):
    pass


@dataclass(frozen=True)
class Tls:
    """TLS for the server: QEMU reads the keys from `directory` (no key on the
    command line). `kind` psk (keys.psk) or x509 (ca-cert.pem, server-cert.pem,
    server-key.pem); with x509, `verify_peer` makes clients show a certificate
    of the CA."""

    kind: Literal["psk", "x509"]
    directory: str
    priority: str | None = None  # a GnuTLS priority string
    verify_peer: bool = True

    def object_spec(self, obj_id: str = "tls0") -> str:
        spec = f"tls-creds-{self.kind},id={obj_id},endpoint=server,dir={self.directory}"
        if self.priority:
            spec += f",priority={self.priority}"
        if self.kind == "x509" and self.verify_peer:
            spec += ",verify-peer=on"
        return spec


class Server:
    def __init__(
        self,
        image: str,
        fmt: str = "raw",
        export_name: str = "",
        host: str = "127.0.0.1",
        port: int | None = None,
        shared: int = 8,
        read_only: bool = True,
        cache: str = "none",
        aio: str = "native",
        unix_socket: str | None = None,
        tls: Tls | None = None,
    ) -> None:
        self.image = image
        self.fmt = fmt
        self.export_name = export_name
        self.host = host
        self.port = port or free_port(host)
        self.shared = shared
        self.read_only = read_only
        self.cache = cache
        self.aio = aio
        self.unix_socket = unix_socket
        self.tls = tls
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def address(self) -> NbdAddress:
        if self.unix_socket:
            return NbdAddress.unix(self.unix_socket, self.export_name)
        return NbdAddress.tcp(self.host, self.port, self.export_name)

    @property
    def url(self) -> str:
        return self.address.url()

    def _answers(self) -> bool:
        try:
            if self.unix_socket:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(0.2)
                    s.connect(self.unix_socket)
            else:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
        except OSError:
            return False
        return True

    def argv(self) -> list[str]:
        argv = [
            os.environ.get("THINAIR_QEMU_NBD", "qemu-nbd"),
            "--persistent",
            f"--shared={self.shared}",
            f"--format={self.fmt}",
            f"--export-name={self.export_name}",
            f"--cache={self.cache}",
            f"--aio={self.aio}",
        ]
        if self.unix_socket:
            argv.append(f"--socket={self.unix_socket}")
        else:
            argv += [f"--bind={self.host}", f"--port={self.port}"]
        if self.tls is not None:
            argv += ["--object", self.tls.object_spec("tls0"), "--tls-creds=tls0"]
        if self.read_only:
            argv.append("--read-only")
        argv.append(self.image)
        return argv

    def start_detached(self, pid_file: str, log_file: str, timeout: float = 30.0) -> int:
        """Start the server in its own session (it survives us) and return its pid.
        qemu-nbd --fork returns once the server listens; its messages, then and
        later, go to `log_file`. Raises ServerError with qemu-nbd's words."""
        argv = self.argv()
        argv[-1:-1] = ["--fork", f"--pid-file={pid_file}"]
        try:
            return start_detached(argv, Path(pid_file), Path(log_file), timeout=timeout)
        except StartFailed as e:
            raise ServerError(e.reason, argv, e.detail) from e

    def start(self, timeout: float = 10.0) -> None:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server)
        argv = self.argv()
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                err = self._read_stderr()
                rc = self._proc.returncode
                self._proc = None
                raise ServerError(f"qemu-nbd exited with {rc}: {err or '(no output)'}", argv, err)
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"qemu-nbd did not listen at {self.url}", argv)
            time.sleep(0.05)

    def _read_stderr(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()

    def stop(self, timeout: float = 5.0) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            log.debug("qemu-nbd exited %s: %s", self._proc.returncode, self._read_stderr())
            self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
