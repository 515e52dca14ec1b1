"""Rollback and import with 1, 4 and 16 VMs at once.

One 256 MiB raw image holding 64 MiB of random data (4 extents of 16 MiB) is
exported read-only by qemu-nbd (--shared=40); each VM runs on its own temporary
disk over it (64 MiB of memory, nothing bootable: a block job needs a running
domain, not a booted guest). For N in 1, 4, 16, twice N VMs are created and
started; then, each from its own thread and SDK client, released together:
  - N rollbacks: wall time from the first request to the last answer;
  - N mirror imports to the other storage domain: wall time from the first
    job's creation to the last job's end, by the engine's own timestamps.
Figures: rollback wall time for N against N=1; aggregate import throughput
(N x 64 MiB / wall time) for N against one import [16 at once >= 0.9x].

    .venv/bin/python bench/concurrency.py [--quick]
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Lab, MiB, Row, bench_main, log, median, write_image  # noqa: E402

from thinair.client import Client, Job  # noqa: E402

DISK = 256 * MiB
DATA = 64 * MiB
COUNTS = (1, 4, 16)


def start_vms(lab: Lab, url: str, count: int, tag: str) -> list[str]:
    c = lab.client()
    names = [lab.vm_name(f"{tag}{i}") for i in range(count)]
    for name in names:
        c.vms.create(name, disks=[f"{url},format=raw,storage=tmp"], memory_mib=64)
        c.vms.start(name)
    return names


def at_once(lab: Lab, names: list[str], action: Callable[[Client, str], object]) -> list[object]:
    """Run `action` for every VM from its own thread and client, released together."""
    clients = [lab.client() for _ in names]
    gate = threading.Barrier(len(names))
    results: list[object] = [None] * len(names)

    def one(i: int) -> None:
        gate.wait()
        try:
            results[i] = action(clients[i], names[i])
        except Exception as e:  # reported below, with the others
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for client in clients:
        client.close()
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(names)} failed: {errors[0]}")
    return results


def rollback_wall(lab: Lab, url: str, count: int, tag: str) -> float:
    names = start_vms(lab, url, count, tag)
    began = time.monotonic()
    at_once(lab, names, lambda c, name: c.vms.rollback(name))
    return time.monotonic() - began


def import_wall(lab: Lab, url: str, count: int, tag: str) -> float:
    names = start_vms(lab, url, count, tag)
    submitted = at_once(
        lab, names, lambda c, name: c.vms.import_(name, to="final", strategy="mirror")
    )
    c = lab.client()
    ended = []
    for job in submitted:
        assert isinstance(job, Job)
        ended.append(c.jobs.wait(job.id, timeout=900))
    failed = [j for j in ended if j.state != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} imports did not succeed: {failed[0].error}")
    first = min(j.created_at for j in ended)
    last = max(j.finished_at for j in ended if j.finished_at is not None)
    for name in names:
        lab.remove_vm(name)
    return (last - first).total_seconds()


def run(quick: bool) -> list[Row]:
    rounds = 1 if quick else 2
    rollback: dict[int, list[float]] = {}
    imports: dict[int, list[float]] = {}
    with Lab("many") as lab:
        image = lab.path("template.raw")
        write_image(image, DISK, [(i * DISK // 4, DATA // 4) for i in range(4)])
        url = lab.export(image, shared=2 * max(COUNTS) + 8).url
        for round_no in range(rounds):
            for count in COUNTS:
                tag = f"r{round_no}n{count}-"
                rollback.setdefault(count, []).append(rollback_wall(lab, url, count, "rb" + tag))
                imports.setdefault(count, []).append(import_wall(lab, url, count, "im" + tag))
                log(
                    f"N={count}: rollback {rollback[count][-1]:.2f} s, "
                    f"import {imports[count][-1]:.2f} s "
                    f"({count * DATA / MiB / imports[count][-1]:.0f} MiB/s)"
                )
    rows = []
    for count in COUNTS[1:]:
        rows.append(
            Row(
                f"rollback, {count} VMs at once: wall time (x 1 VM)",
                median(rollback[count]),
                "s",
                reference=median(rollback[1]),
                detail={"seconds": rollback[count], "one": rollback[1]},
            )
        )
    single = DATA / MiB / median(imports[1])
    for count in COUNTS[1:]:
        aggregate = count * DATA / MiB / median(imports[count])
        rows.append(
            Row(
                f"import, {count} VMs at once: aggregate MiB/s (x 1 import)",
                aggregate,
                "MiB/s",
                reference=single,
                target="ratio >= 0.9" if count == 16 else "",
                met=aggregate / single >= 0.9 if count == 16 else None,
                detail={"seconds": imports[count], "one": imports[1]},
            )
        )
    return rows


if __name__ == "__main__":
    bench_main("concurrency", run, __doc__)
