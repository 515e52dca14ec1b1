"""Crash points for the fault-injection tests.

With THINAIR_TEST_CRASH_AT=NAME in its environment the engine SIGKILLs itself
when it reaches the point NAME, as a power cut would there: no cleanup, no
finally blocks. Each flow records its intent before acting, so the tests can
then restart the engine and check that the reconciler finishes or undoes it.

With THINAIR_TEST_KILL_QEMU_AT=NAME the engine SIGKILLs, at the point NAME, the
QEMU of the VM the flow works on (as an OOM kill or a QEMU crash would) and goes
on: the flow must then cope with a VM that is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from thinair.adapters import procfs

log = logging.getLogger(__name__)

VARIABLE = "THINAIR_TEST_CRASH_AT"
QEMU_VARIABLE = "THINAIR_TEST_KILL_QEMU_AT"
QEMU_PROGRAMS = frozenset({"qemu-system-x86_64"})


def crash_point(name: str, vm: str | None = None) -> None:
    if os.environ.get(VARIABLE) == name:
        log.warning("crash point %s: killing the engine", name)
        os.kill(os.getpid(), signal.SIGKILL)
    if vm is not None and os.environ.get(QEMU_VARIABLE) == name:
        for pid in procfs.find(QEMU_PROGRAMS, f"guest={vm},"):
            log.warning("crash point %s: killing QEMU of %s (pid %d)", name, vm, pid)
            os.kill(pid, signal.SIGKILL)
            while os.path.exists(f"/proc/{pid}"):
                time.sleep(0.01)
