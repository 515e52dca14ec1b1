"""Running a tool: argv in, stdout out, a clear error carrying the tool's words."""

from __future__ import annotations

import logging
import subprocess

log = logging.getLogger(__name__)


class CommandFailed(Exception):
    """A tool exited non-zero or did not finish in time."""

    def __init__(self, argv: list[str], returncode: int | None, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr.strip()
        what = "timed out" if returncode is None else f"exited with {returncode}"
        super().__init__(f"{argv[0]} {what}: {self.stderr or '(no output)'}")


def run(argv: list[str], timeout: float | None = None) -> str:
    log.debug("running %s", argv)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise CommandFailed(argv, None, stderr) from None
    if done.returncode != 0:
        raise CommandFailed(argv, done.returncode, done.stderr)
    return done.stdout
