"""ReadsWatch reads a bridge's log (nbdkit's log filter, lines as 1.32 writes
them) as it grows: which reads are unanswered, and which ranges were fetched."""

from __future__ import annotations

import time
from pathlib import Path

from thinair.adapters.nbdkit import ReadsWatch

MiB = 2**20


def _line(text: str) -> str:
    return f"2026-12-02 05:52:20.224728 {text}\n"


def test_unanswered_reads_are_busy_and_answered_ones_fetched(tmp_path: Path) -> None:
    log = tmp_path / "reads"
    watch = ReadsWatch(log, hold=0.2, period=0)
    assert not watch.busy()  # no log yet: idle
    with open(log, "w") as f:
        f.write(_line("Ready thread_model=3"))
        f.write(_line("connection=1 Read id=1 offset=0x100000 count=0x100000 ..."))
        f.write(_line("connection=1 Read id=2 offset=0x300000 count=0x100000 ..."))
        f.write(_line("connection=1 ...Read id=2 return=-1 (Input/output error)"))
        f.write("2026-12-02 05:52:20.3 connection=1 Rea")  # half a line, so far
    assert watch.busy() and watch.reads == 2
    assert watch.busy(linger=False)  # id=1 is on the link
    assert not watch.covers(MiB, MiB)  # asked, not answered
    with open(log, "a") as f:
        f.write("d id=3 offset=0x0 count=0x100000 ...\n")
        f.write(_line("connection=1 ...Read id=1 return=0"))
        f.write(_line("connection=1 ...Read id=3 return=0"))
    assert watch.busy()  # answered just now: still within the hold
    assert not watch.busy(linger=False)  # but none is on the link
    assert watch.covers(0, 2 * MiB) and watch.covers(MiB + 4096, 4096)
    assert not watch.covers(MiB, 2 * MiB + 1)  # the block past it was not fetched
    assert not watch.covers(3 * MiB, 4096)  # failed
    time.sleep(0.25)
    assert not watch.busy() and watch.reads == 3
    log.write_text(_line("Ready thread_model=3"))  # a new bridge: a new, empty cache
    assert not watch.busy() and not watch.covers(0, 4096)
