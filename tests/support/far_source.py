"""A source far away, on loopback: nbdkit serving an image read-only over TCP
with a delay added to each read request (nbdkit's delay filter: the requests
stay parallel, as over a WAN) and optionally a bandwidth cap (the rate filter).
It can be stopped and started again on the same port, as a source server that
goes away and comes back. This kernel has no sch_netem, hence nbdkit's filters.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from thinair.adapters import procfs

PROGRAMS = frozenset({"nbdkit"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FarSource:
    def __init__(
        self,
        image: Path,
        pid_file: Path,
        delay_ms: float = 0,
        rate: str | None = None,
        port: int | None = None,
        log_file: Path | None = None,
        burst: float | None = None,
    ) -> None:
        self.image = image
        self.pid_file = pid_file
        self.delay_ms = delay_ms
        self.rate = rate  # e.g. "100M" (bits per second, nbdkit's rate filter)
        self.port = port or free_port()
        self.log_file = log_file  # every request the source answers (nbdkit's log filter)
        # Seconds of `rate` the link may send at once after an idle time (the rate
        # filter's burstiness, 2 s by default: a 1 MiB read after a pause would
        # then cost no time at 100 Mbit/s, where a real link takes 84 ms).
        self.burst = burst

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        argv = ["nbdkit", "--readonly", "-i", "127.0.0.1", "-p", str(self.port)]
        argv += ["-P", str(self.pid_file)]
        filters = []
        params = []
        if self.log_file:
            filters.append("--filter=log")
            params.append(f"logfile={self.log_file}")
        if self.delay_ms:
            filters.append("--filter=delay")
            params.append(f"rdelay={self.delay_ms:g}ms")
        if self.rate:
            filters.append("--filter=rate")
            params.append(f"rate={self.rate}")
            if self.burst is not None:
                params.append(f"burstiness={self.burst:g}")
        return [*argv, *filters, "file", f"file={self.image}", *params]

    def start(self) -> FarSource:
        self.pid_file.unlink(missing_ok=True)
        subprocess.run(self.argv(), check=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not (self.pid_file.exists() and self.pid_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError("nbdkit wrote no pid file")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Gone: the port refuses connections and open ones are closed."""
        pid = procfs.from_pid_file(self.pid_file, PROGRAMS, str(self.pid_file))
        if pid is not None:
            procfs.terminate(pid, PROGRAMS, str(self.pid_file))
        self.pid_file.unlink(missing_ok=True)

    def __enter__(self) -> FarSource:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


_READ = re.compile(r"Read id=[0-9]+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)")


def reads(log_file: Path) -> list[tuple[int, int]]:
    """(offset, length) of every read request in a source's log, in order."""
    text = log_file.read_text() if log_file.exists() else ""
    return [(int(m.group(1), 16), int(m.group(2), 16)) for m in _READ.finditer(text)]


def blocks_sent(seen: list[tuple[int, int]], size: int = 2**20) -> list[int]:
    """The `size` blocks that reads (offset, length) touched, each as often as read."""
    return [b for off, n in seen for b in range(off // size, (off + n + size - 1) // size)]
