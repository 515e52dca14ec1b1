"""Crash points for the fault-injection tests.

With THINAIR_TEST_CRASH_AT=NAME in its environment the engine SIGKILLs itself
when it reaches the point NAME, as a power cut would there: no cleanup, no
finally blocks. Each flow records its intent before acting, so the tests can
then restart the engine and check that the reconciler finishes or undoes it.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

VARIABLE = "THINAIR_TEST_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(VARIABLE) == name:
        log.warning("crash point %s: killing the engine", name)
        os.kill(os.getpid(), signal.SIGKILL)
