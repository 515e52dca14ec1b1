"""One engine's job runner, as its own process, for the tests of several engines
on one database: `python -m tests.support.job_worker DB_URL HOME LOG`.

It registers a flow `count` that writes "start JOB PID" and "end JOB PID" to LOG
(and waits while the file LOG.hold exists), resumes every job nobody runs, and
keeps looking for more until it is killed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from thinair.config import Settings
from thinair.engine.build import build
from thinair.engine.context import EngineContext
from thinair.engine.jobs import JobHandle


def _write(log: Path, line: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())  # one write: lines never interleave
    finally:
        os.close(fd)


def main() -> None:
    url, home, log = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    hold = Path(f"{log}.hold")
    ctx = build(Settings(home=home, db=url, libvirt_uri="test:///default"), poll_interval=0.2)
    ctx.migrate()

    def count(_ctx: EngineContext, job: JobHandle) -> None:
        _write(log, f"start {job.id} {os.getpid()}")
        time.sleep(float(job.params.get("seconds", 0.1)))
        while hold.exists():
            time.sleep(0.05)
        _write(log, f"end {job.id} {os.getpid()}")

    runner = ctx.jobs
    runner.flows["count"] = count
    ready = Path(f"{home}.ready")
    ready.write_text("")
    go = Path(f"{log}.go")
    while not go.exists():  # start together with the other workers
        time.sleep(0.01)
    runner.resume_all()
    runner.start_polling()
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
