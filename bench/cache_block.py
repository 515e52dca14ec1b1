"""The bridge's cache block size against the guest's read throughput, near and far.

A tuning study, no target: for each `THINAIR_BRIDGE_CACHE_BLOCK_KIB`, the guest's
one-at-a-time uncached random 4 KiB and sequential 1 MiB reads (as
bench/far_reads.py makes them, through the VM's own QEMU) from a source with no
delay and with 25 ms per read request. A miss fetches a whole block in one
request, so larger blocks carry more of a sequential read per round trip and
cost more for a random one; the reference of each row is the default block
size's figure at the same distance. Best of the rounds.

    .venv/bin/python bench/cache_block.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import far_reads  # noqa: E402
from common import Lab, Row, bench_main, log, write_image  # noqa: E402

from thinair.config import Settings  # noqa: E402

BLOCKS_KIB = (1024, 4096, 8192)


def run(quick: bool) -> list[Row]:
    rounds = 1 if quick else 2
    default = Settings().bridge_cache_block_kib
    best: dict[tuple[int, int, str], float] = {}
    for kib in BLOCKS_KIB:
        lab = Lab(f"cache-block-{kib}")
        lab.engine.extra_env = {"THINAIR_BRIDGE_CACHE_BLOCK_KIB": str(kib)}
        with lab:
            image = lab.path("data.raw")
            write_image(image, far_reads.DISK_SIZE, [(0, far_reads.DISK_SIZE)])
            for round_no in range(rounds):
                for delay in (0, 25):
                    got = far_reads.throughput(lab, image, delay, round_no)
                    log(
                        f"{kib} KiB blocks, round {round_no}, {delay} ms: "
                        + ", ".join(f"{k} {v:.2f} MiB/s" for k, v in got.items())
                    )
                    for kind, value in got.items():
                        key = (kib, delay, kind)
                        best[key] = max(best.get(key, 0.0), value)
    rows = []
    for delay in (0, 25):
        for kind in ("random", "sequential"):
            for kib in BLOCKS_KIB:
                size = "4 KiB" if kind == "random" else "1 MiB"
                rows.append(
                    Row(
                        f"guest {kind} {size} reads, {delay} ms/request, {kib} KiB cache blocks",
                        best[(kib, delay, kind)],
                        "MiB/s",
                        reference=best[(default, delay, kind)],
                    )
                )
    return rows


if __name__ == "__main__":
    bench_main("cache_block", run, __doc__)
