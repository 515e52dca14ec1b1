"""Running a tool: argv in, stdout out, a clear error carrying the tool's words;
and starting a server that detaches itself and names its pid in a pid file."""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from thinair.adapters.errors import CommandFailed, StartFailed

__all__ = ["CommandFailed", "StartFailed", "run", "start_detached"]

log = logging.getLogger(__name__)


def run(argv: list[str], timeout: float | None = None) -> str:
    log.debug("running %s", argv)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise CommandFailed(argv, None, stderr) from e
    if done.returncode != 0:
        raise CommandFailed(argv, done.returncode, done.stderr)
    return done.stdout


def _read_from(out: IO[bytes], path: Path | None, offset: int) -> str:
    if path is not None:  # opened for appending only
        out.flush()
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace").strip()
    out.seek(offset)
    return out.read().decode(errors="replace").strip()


def start_detached(
    argv: list[str],
    pid_file: Path,
    log_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    pid_timeout: float = 10.0,
) -> int:
    """Start a server that forks into the background once it listens (its first
    process exits 0 then, or non-zero with the reason), and return the pid its
    pid file names. What it says goes to `log_file` (appended) when given.

    The pid file is removed first, and read only once it holds a whole line: a
    forking server may write it after its first process has exited. Raises
    StartFailed with the server's last line (its name in front dropped), or
    saying what it did not do in time."""
    program = os.path.basename(argv[0])
    pid_file.unlink(missing_ok=True)
    log.debug("starting %s", argv)
    with (
        open(log_file, "ab") if log_file is not None else tempfile.TemporaryFile()
    ) as out:  # (the server may keep it open: a deleted file then)
        start = out.tell()
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=out,
                timeout=timeout,
                check=False,
                env=dict(env) if env is not None else None,
            )
        except subprocess.TimeoutExpired as e:
            raise StartFailed(argv, f"{program} did not start in {timeout:g} s") from e
        if done.returncode != 0:
            said = _read_from(out, log_file, start)
            last = said.splitlines()[-1] if said else f"{program} exited with {done.returncode}"
            raise StartFailed(argv, last.removeprefix(f"{program}: "), said)
    deadline = time.monotonic() + pid_timeout
    while True:
        try:
            text = pid_file.read_text()
        except FileNotFoundError:
            text = ""
        if text.endswith("\n") and text.strip().isdigit():
            return int(text)
        if time.monotonic() > deadline:
            raise StartFailed(argv, f"{program} started but wrote no pid file in {pid_timeout:g} s")
        time.sleep(0.01)
