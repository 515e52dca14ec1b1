"""Time to the guest's boot marker: external disk (NBD) against the same image local.

The test guest image (scripts/build-guest-image.sh) is exported read-only by
qemu-nbd, as another host would, and also copied to a local file given to thinair
as a path. Per round and disk, the SDK creates and starts a 256 MiB VM on it, and
the console log file (virtlogd writes it) is followed every 5 ms for
THINAIR-BOOT-OK (the guest's /init runs, vda is there) and THINAIR-PATTERN (the
guest has read and hashed 64 MiB more of vda). Times run from the create call.
Figures: external time against local time, for each marker.

    .venv/bin/python bench/boot_marker.py [--quick]
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ConsoleWatch, Lab, Row, bench_main, guest_image, log, median  # noqa: E402

from tests.support import guest  # noqa: E402


def boot(lab: Lab, name: str, disk: str, memory_mib: int = 256) -> dict[str, float]:
    """Create and start a VM on `disk`, wait for the guest's boot and pattern
    markers; seconds from the create call to each. The VM is left running."""
    c = lab.client()
    began = time.monotonic()
    vm = c.vms.create(name, disks=[f"{disk},storage=tmp"], memory_mib=memory_mib)
    created = time.monotonic()
    with ConsoleWatch(lab.console_log(vm.id)) as watch:
        c.vms.start(name)
        started = time.monotonic()
        boot_ok = watch.wait(guest.MARK_BOOT_OK)
        pattern = watch.wait(guest.MARK_PATTERN)
    return {
        "create": created - began,
        "start": started - created,
        "boot_ok": boot_ok - began,
        "pattern": pattern - began,
    }


def run(quick: bool) -> list[Row]:
    rounds = 1 if quick else 3
    times: dict[str, list[dict[str, float]]] = {"external": [], "local": []}
    with Lab("boot") as lab:
        local = lab.path("guest-local.raw")
        shutil.copyfile(guest_image(), local)
        local.chmod(0o644)
        server = lab.export(guest_image())
        disks = {"external": server.url, "local": str(local)}
        for round_no in range(rounds):
            order = ["external", "local"] if round_no % 2 == 0 else ["local", "external"]
            for where in order:
                name = lab.vm_name(f"{where}{round_no}")
                took = boot(lab, name, disks[where])
                lab.remove_vm(name)
                times[where].append(took)
                log(
                    f"{where}: create {took['create']:.2f} s, start {took['start']:.2f} s, "
                    f"boot marker {took['boot_ok']:.2f} s, pattern {took['pattern']:.2f} s"
                )
    rows = []
    for key, what in (("boot_ok", "boot marker"), ("pattern", "pattern read (+64 MiB)")):
        rows.append(
            Row(
                f"create to {what}: external NBD (x local file)",
                median([t[key] for t in times["external"]]),
                "s",
                reference=median([t[key] for t in times["local"]]),
                detail={"external": times["external"], "local": times["local"]}
                if key == "boot_ok"
                else {},
            )
        )
    return rows


if __name__ == "__main__":
    bench_main("boot_marker", run, __doc__)
