"""The adapters' one error base: what was asked of a tool or a library, and what
it answered.

    AdapterError        call (a command's argv or a library call), detail (its words)
     +-- CommandFailed  a command exited non-zero or did not finish in time
     +-- StartFailed    a server did not start (it exited, or wrote no pid file)
     +-- VirtError      a libvirt call failed (also a thinair BackendError)
     +-- the adapters' own: nbdkit.BridgeError, qemu_nbd.ServerError, ...

An adapter raises these with the library's exception as the cause (`raise ...
from e`), so a traceback shows both; the engine turns them into thinair's errors
(thinair.errors), keeping the adapter's as their cause.
"""

from __future__ import annotations

from collections.abc import Sequence


class AdapterError(Exception):
    """A tool or a library failed. `call` is what was asked of it (a command's
    argv, a libvirt call's name and arguments), `detail` what it said (stderr,
    libvirt's message); both may be empty where there is nothing to say."""

    def __init__(self, message: str, call: Sequence[str] | str = (), detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.call = call
        self.detail = detail


class CommandFailed(AdapterError):
    """A tool exited non-zero (returncode) or did not finish in time (None)."""

    def __init__(self, argv: list[str], returncode: int | None, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr.strip()
        what = "timed out" if returncode is None else f"exited with {returncode}"
        super().__init__(f"{argv[0]} {what}: {self.stderr or '(no output)'}", argv, self.stderr)


class StartFailed(AdapterError):
    """A server started detached did not come up: `reason` is its own last words
    (without its name in front) or what it failed to do in time."""

    def __init__(self, argv: list[str], reason: str, output: str = "") -> None:
        self.argv = argv
        self.reason = reason
        super().__init__(reason, argv, output.strip())
