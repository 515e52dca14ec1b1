"""qemu-nbd: serve an image read-only over NBD, as a child process we own.

`Server.start()` waits until the export answers and cleans up if it never does;
`stop()` goes terminate -> timeout -> kill and logs what the server said.
The binary can be overridden with THINAIR_QEMU_NBD.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import tempfile
import time
from types import TracebackType
from typing import IO

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerError(Exception):
    pass


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
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nbd://{self.host}:{self.port}/{self.export_name}"

    def argv(self) -> list[str]:
        argv = [
            os.environ.get("THINAIR_QEMU_NBD", "qemu-nbd"),
            "--persistent",
            f"--shared={self.shared}",
            f"--format={self.fmt}",
            f"--bind={self.host}",
            f"--port={self.port}",
            f"--export-name={self.export_name}",
            f"--cache={self.cache}",
            f"--aio={self.aio}",
        ]
        if self.read_only:
            argv.append("--read-only")
        argv.append(self.image)
        return argv

    def start(self, timeout: float = 10.0) -> None:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server)
        self._proc = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                err = self._read_stderr()
                rc = self._proc.returncode
                self._proc = None
                raise ServerError(f"qemu-nbd exited with {rc}: {err or '(no output)'}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"qemu-nbd did not listen on {self.host}:{self.port}")
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
