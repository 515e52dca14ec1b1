"""Read speed of a VM's disk during an import, against after it (and before it).

The test guest cannot be told to read, so the reads are made inside the VM's own
QEMU, on the guest's virtio drive: HMP `qemu-io -d <the drive's qdev path>
"read OFFSET 32M"` through libvirt. That is the guest's block backend (the same
node graph, block job filters and NBD connection the guest's reads go through),
without the guest kernel; each read is timed from outside (libvirt round trip
included, about 5 ms against 30-300 ms per read).

The disk is a 1 GiB raw image full of random data, exported read-only by
qemu-nbd; the VM runs (nothing bootable) on its temporary disk. Per strategy
(bulk and mirror, to the other storage domain), 32 MiB reads at fresh
offsets are timed:
  - before the import (every read goes to the NBD server),
  - during a bandwidth-unlimited import (only reads that start and end while
    the copy runs count; from the end of the disk, where the copy gets last),
  - after it (the same offsets as during, now local).
Figures: MiB/s during and before, each against after.

    .venv/bin/python bench/read_during_import.py [--quick]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import libvirt  # noqa: E402
from common import GiB, Lab, MiB, Row, bench_main, log, read_seconds, write_image  # noqa: E402

DISK_SIZE = GiB
CHUNK = 32 * MiB
BEFORE_CHUNKS = 6


def rate(seconds: list[float]) -> float:
    return len(seconds) * CHUNK / MiB / sum(seconds)


def measure(lab: Lab, url: str, strategy: str) -> dict[str, list[float]]:
    c = lab.client()
    name = lab.vm_name(strategy)
    home = "tmp"
    c.vms.create(name, disks=[f"{url},format=raw,storage={home}"], memory_mib=64)
    c.vms.start(name)
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName(name)
        before = [read_seconds(dom, i * CHUNK, CHUNK) for i in range(BEFORE_CHUNKS)]
        fresh = [i * CHUNK for i in range(DISK_SIZE // CHUNK - 1, BEFORE_CHUNKS - 1, -1)]
        job = c.vms.import_(name, to="final", strategy=strategy)
        during: list[float] = []
        read_at: list[int] = []
        while fresh:
            state = c.jobs.get(job.id)
            if state.state not in ("pending", "running"):
                break
            if not state.step.startswith(("copy", "pull")):
                time.sleep(0.01)
                continue
            offset = fresh.pop(0)
            took = read_seconds(dom, offset, CHUNK)
            state = c.jobs.get(job.id)
            if state.state == "running" and state.step.startswith(("copy", "pull")):
                during.append(took)  # the copy ran for the whole read
                read_at.append(offset)
        final = c.jobs.wait(job.id, timeout=600)
        if final.state != "succeeded":
            raise RuntimeError(f"{strategy} import {final.state}: {final.error}")
        after = [read_seconds(dom, offset, CHUNK) for offset in read_at or [0]]
    finally:
        conn.close()
        lab.remove_vm(name)
    return {"before": before, "during": during, "after": after}


def run(quick: bool) -> list[Row]:
    rounds = 1 if quick else 2
    results: dict[str, dict[str, list[float]]] = {}
    with Lab("read") as lab:
        image = lab.path("data.raw")
        write_image(image, DISK_SIZE, [(0, DISK_SIZE)])
        server = lab.export(image)
        for round_no in range(rounds):
            for strategy in ("bulk", "mirror"):
                got = measure(lab, server.url, strategy)
                mine = results.setdefault(strategy, {"before": [], "during": [], "after": []})
                for phase, seconds in got.items():
                    mine[phase] += seconds
                log(
                    f"round {round_no} {strategy}: "
                    + ", ".join(
                        f"{phase} {rate(s):.0f} MiB/s ({len(s)} reads)" if s else f"{phase} -"
                        for phase, s in got.items()
                    )
                )
    rows = []
    for strategy, phases in results.items():
        after = rate(phases["after"])
        counts = {phase: len(s) for phase, s in phases.items()}
        if phases["during"]:
            rows.append(
                Row(
                    f"VM disk read during {strategy} import, MiB/s (x after)",
                    rate(phases["during"]),
                    "MiB/s",
                    reference=after,
                    detail={"reads": counts},
                )
            )
        rows.append(
            Row(
                f"VM disk read before {strategy} import, MiB/s (x after)",
                rate(phases["before"]),
                "MiB/s",
                reference=after,
            )
        )
    return rows


if __name__ == "__main__":
    bench_main("read_during_import", run, __doc__)
