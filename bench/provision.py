"""Provisioning: many VMs from one template image that thinair exports.

The test guest image is exposed by the engine (`thinair expose`, one qemu-nbd
serving every VM); each VM gets its own qcow2 overlay over it (128 MiB of
memory; the test guest does not boot in 64 MiB here). First one VM alone
(created, started, booted: the reference), then N (50; 10 with --quick)
created and started from 8 threads, until every guest printed on its console
(its boot loader read the kernel and initramfs through the export; a full boot
of 50 TCG guests on two cores is CPU-bound, and starved guest kernels may panic
in their timer check, so boots are counted, not waited for).
Figures:
  - time to N running VMs (libvirt says running) against N x one VM's;
  - time to N guests' kernels loaded against one guest's;
  - the export's read throughput while the N load against while one does
    (image bytes the server read, over that time);
  - storage the N overlays take against one copy of the template [< 1].

    .venv/bin/python bench/provision.py [--quick]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Lab, MiB, Row, bench_main, guest_image, log  # noqa: E402

from tests.support.provision import Provisioned, provision, wait_kernels  # noqa: E402

MEMORY_MIB = 128


def _run_batch(lab: Lab, url: str, export_id: str, count: int, tag: str) -> tuple[Provisioned, int]:
    c = lab.client()
    before = c.exports.get(export_id).bytes_read or 0
    names = [lab.vm_name(f"{tag}{i}") for i in range(count)]
    result = provision(lab.client, url, names, memory_mib=MEMORY_MIB, storage="tmp")
    wait_kernels(c, result)
    read = (c.exports.get(export_id).bytes_read or 0) - before
    log(
        f"{count} VM(s): running in {result.running:.1f} s, kernels loaded in "
        f"{result.started:.1f} s ({len(result.booted)} booted by then), "
        f"export read {read / MiB:.0f} MiB"
    )
    return result, read


def _overlays(lab: Lab) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in lab.path("tmp").iterdir())


def run(quick: bool) -> list[Row]:
    count = 10 if quick else 50
    image = guest_image()
    with Lab("prov") as lab:
        c = lab.client()
        export = c.exports.create(image=str(image), format="raw", shared=count + 16)
        one, one_read = _run_batch(lab, export.url, export.id, 1, "one")
        for name in one.names:
            lab.remove_vm(name)
        many, many_read = _run_batch(lab, export.url, export.id, count, "n")
        used = _overlays(lab)
        assert one.started is not None and many.started is not None
    template = os.stat(image).st_size
    return [
        Row(
            f"time to {count} running VMs (x {count} x one VM)",
            many.running,
            "s",
            reference=count * one.running,
            target="ratio <= 1",
            met=many.running <= count * one.running,
            detail={"created": many.created, "one": one.running},
        ),
        Row(
            f"time to {count} guests' kernels loaded (x one guest)",
            many.started,
            "s",
            reference=one.started,
            detail={"times": sorted(many.start_times.values()), "booted": len(many.booted)},
        ),
        Row(
            f"export throughput while {count} load (x one)",
            many_read / MiB / many.started,
            "MiB/s",
            reference=one_read / MiB / one.started,
            detail={"bytes_read": many_read, "one_bytes_read": one_read},
        ),
        Row(
            f"storage of {count} overlays (x one template copy)",
            used / MiB,
            "MiB",
            reference=template / MiB,
            target="ratio < 1",
            met=used < template,
        ),
    ]


if __name__ == "__main__":
    bench_main("provision", run, __doc__)
