"""Helpers for export tests: a recognizable image, a bounded packet capture on
loopback, a search of the capture for the image's bytes, and a sweep of the
export servers a test's engines left (they outlive the engine by design)."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from thinair.adapters import procfs
from thinair.engine.exports import PROGRAMS

PIECE = 64


def pattern_image(path: Path, size: int = 4 * 2**20) -> bytes:
    """A raw image of random bytes (no 64-byte piece occurs by chance elsewhere)."""
    data = os.urandom(size)
    path.write_bytes(data)
    path.chmod(0o644)
    return data


def pieces_found(data: bytes, haystack: bytes) -> int:
    """How many 64-byte-aligned pieces of `data` occur anywhere in `haystack`.
    Any run of 127 plaintext bytes of the image holds one whole aligned piece."""
    pieces = {data[i : i + PIECE] for i in range(0, len(data) - PIECE + 1, PIECE)}
    found = set()
    for i in range(len(haystack) - PIECE + 1):
        window = haystack[i : i + PIECE]
        if window in pieces:
            found.add(window)
    return len(found)


@contextmanager
def capture(port: int, out: Path, limit: float = 60.0) -> Iterator[Path]:
    """tcpdump of loopback traffic to and from `port` into `out` while the block
    runs; tcpdump is bounded by `limit` seconds whatever happens."""
    proc = subprocess.Popen(
        ["timeout", str(limit), "tcpdump", "-i", "lo", "-U", "--immediate-mode"]
        + ["-s", "0", "-B", "65536"]
        + ["-w", str(out)]
        + ["tcp", "port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    said = b""
    deadline = time.monotonic() + 10
    # tcpdump says "listening on lo" once the capture runs: only then start.
    while b"listening on" not in said:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"tcpdump did not start: {said.decode(errors='replace')}")
        ready, _, _ = select.select([proc.stderr], [], [], 0.2)
        if ready:
            said += os.read(proc.stderr.fileno(), 4096)
    try:
        yield out
    finally:
        # tcpdump drops what it has not read yet when told to stop: let it drain
        # (the file stops growing) first.
        _wait_until_still(out)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=20)[1]
    # "N packets dropped by kernel": a capture with holes proves nothing.
    summary = (said + rest).decode(errors="replace")
    dropped = re.search(r"^(\d+) packets dropped by kernel", summary, re.M)
    assert dropped is not None and dropped.group(1) == "0", summary


def _wait_until_still(path: Path, quiet: float = 0.5, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    size, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = path.stat().st_size if path.exists() else 0
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def server_processes(marker: str) -> dict[int, str]:
    return procfs.find(PROGRAMS, marker)


def stop_servers(marker: str) -> None:
    for pid in server_processes(marker):
        procfs.terminate(pid, PROGRAMS, marker)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout:g} s")
        time.sleep(0.05)
