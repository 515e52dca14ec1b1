"""What a bridge's cache pays to write what it fetched, by the shape of its writes.

The bridge's cache (nbdkit's cow filter) writes each read it fetched from the
source into its file in one pwrite. Linux (6.x, ext4 with large folios) keeps a
write that covers a whole aligned 2 MiB range in one 2 MiB page of its page
cache; on this VM allocating such pages cost far more than smaller ones (the
host backs them). So the engine's readahead cuts its reads at odd MiB offsets
(thinair.engine.readahead.PIECE). This measures the CPU time of writing 256 MiB
to a new file (deleted, as the cache's is) in the writes a cache of 1 MiB blocks
makes: 1 MiB, 2 MiB at even and at odd MiB offsets, 4 MiB; each after a pause
(memory freed long enough is given back to the host and costs again). A report,
no target: the figure that depends on it is far_reads' sequential reads.

    .venv/bin/python bench/page_cache_writes.py [--quick]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MiB, Row, bench_main, log  # noqa: E402

TOTAL = 256 * MiB
PAUSE = 6.0  # seconds: freed memory is given back to the host after ~2-5 s here
SHAPES = [
    ("1 MiB writes", MiB, 0),
    ("2 MiB writes at odd MiB", 2 * MiB, MiB),
    ("2 MiB writes at even MiB", 2 * MiB, 0),
    ("4 MiB writes", 4 * MiB, 0),
]


def cpu_seconds(directory: Path, size: int, shift: int) -> float:
    """CPU time of writing TOTAL bytes in `size` writes from offset `shift`."""
    data = os.urandom(size)
    fd, name = tempfile.mkstemp(dir=directory)
    os.unlink(name)
    try:
        began = time.process_time()
        for i in range(TOTAL // size):
            os.pwrite(fd, data, shift + i * size)
        return time.process_time() - began
    finally:
        os.close(fd)


def run(quick: bool) -> list[Row]:
    directory = Path(os.environ.get("THINAIR_HOME", tempfile.gettempdir()))
    best: dict[str, float] = {}
    for round_no in range(1 if quick else 3):
        for what, size, shift in SHAPES:
            time.sleep(PAUSE)
            took = cpu_seconds(directory, size, shift)
            log(f"round {round_no}: {what}: {took * 1000:.0f} ms of CPU")
            best[what] = min(best.get(what, took), took)
    reference = best[SHAPES[0][0]]
    return [
        Row(f"256 MiB in {what}, CPU (x 1 MiB writes)", best[what] * 1000, "ms", reference * 1000)
        for what, _, _ in SHAPES
    ]


if __name__ == "__main__":
    bench_main("page_cache_writes", run, __doc__)
