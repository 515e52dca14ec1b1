"""Servers we started and left running (they outlive the engine): find them,
check that a pid is still the process we started, stop them, and read cheap
figures about them, all from /proc.

A pid alone proves nothing after a restart (pids are reused), so every check
compares the process's executable and command line with what we started: its
command line always holds a path that belongs to one export (its directory
under THINAIR_HOME), which no other server has.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

PROC = Path("/proc")


def cmdline(pid: int) -> list[str] | None:
    """The process's argv, or None when it is gone or a zombie (its work is over)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The state follows the command name, which may hold spaces or parentheses.
    if stat.rpartition(")")[2].split()[0] in ("Z", "X") or not raw:
        return None
    return raw.rstrip(b"\0").decode(errors="replace").split("\0")


def gone(pid: int) -> bool:
    """True once the process has exited and closed its files and sockets: a
    zombie or no process at all. (Its command line is empty a little earlier,
    while it still holds its listening socket.)"""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def executable(pid: int) -> str | None:
    try:
        return os.path.basename(os.readlink(PROC / str(pid) / "exe"))
    except OSError:
        return None


def matches(pid: int, programs: frozenset[str], marker: str) -> bool:
    """True if pid runs one of `programs` with `marker` somewhere on its command line."""
    argv = cmdline(pid)
    if argv is None or executable(pid) not in programs:
        return False
    return marker in " ".join(argv)


def from_pid_file(pid_file: Path, programs: frozenset[str], marker: str) -> int | None:
    """The pid a pid file names, if that process still runs one of `programs`
    with `marker` on its command line (not a reused pid)."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if matches(pid, programs, marker) else None


def find(programs: frozenset[str], marker: str) -> dict[int, str]:
    """Every live process running one of `programs` with `marker` on its command
    line: pid -> the command line joined by spaces."""
    found: dict[int, str] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        argv = cmdline(pid)
        if argv is None:
            continue
        joined = " ".join(argv)
        if marker in joined and executable(pid) in programs:
            found[pid] = joined
    return found


def terminate(pid: int, programs: frozenset[str], marker: str, timeout: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL after `timeout`, a process that is still the one we
    started. Returns False (and sends nothing) when pid is something else now."""
    if not matches(pid, programs, marker):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    pause = 0.001  # an nbdkit bridge exits in a few ms: a flat 20 ms made each stop 20 ms
    while not gone(pid):
        if time.monotonic() > deadline:
            log.warning("pid %d did not exit on SIGTERM in %g s: killing it", pid, timeout)
            # Checked again: it may have exited and its pid been reused meanwhile.
            if matches(pid, programs, marker):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(pause)
        pause = min(pause * 2, 0.02)
    return True


def _hex_port(port: int) -> str:
    return f"{port:04X}"


def tcp_clients(port: int) -> int:
    """Established TCP connections whose local end is `port` (the server's side)."""
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == "01" and local.rsplit(":", 1)[1] == _hex_port(port):
                count += 1
    return count


def unix_clients(path: str) -> int:
    """Connected sockets bound to `path`: the server's ends of its clients'
    connections (an accepted socket carries its listener's path)."""
    count = 0
    try:
        lines = (PROC / "net" / "unix").read_text().splitlines()[1:]
    except OSError:
        return 0
    for line in lines:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode Path; St 03 is connected.
        if len(fields) >= 8 and fields[7] == path and fields[5] == "03":
            count += 1
    return count


def bytes_read(pid: int) -> int | None:
    """Bytes the process read with read(2)-family calls (/proc/PID/io rchar): for
    qemu-nbd with aio=threads these are the image reads that answer clients."""
    try:
        for line in (PROC / str(pid) / "io").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "rchar":
                return int(value)
    except (OSError, ValueError):
        return None
    return None
