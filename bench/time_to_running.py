"""Time to a running VM: thinair against "copy first", for 1 GiB to 1 TiB disks.

Each disk is a raw file exported read-only by qemu-nbd (--shared=8): sparse ones
of 1 GiB, 64 GiB and 1 TiB virtual size (1 MiB of data at each end), and a
4 GiB one with 1 GiB of real data (import_speed's source) to show the linear
part of copying. Per disk and round:
  - thinair: SDK create + start on the export, until the VM is running (start
    returns once libvirt says running; the VM record's state is checked);
  - copy first: nbdcopy of the export to a local raw file, then the same
    create + start on that local file.
Figures: each thinair time against copy-first's (ratio), thinair's 1 TiB time
against its 1 GiB time [flat: <= 1.5x], and the start call alone [< 1 s].
The disk holds nothing bootable: a running domain is what is timed.

    .venv/bin/python bench/time_to_running.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GiB, Lab, MiB, Row, bench_main, log, median, timer, write_image  # noqa: E402
from import_speed import make_source, run_nbdcopy  # noqa: E402

from thinair.client import Client  # noqa: E402

TiB = 2**40
SPARSE = {"1 GiB": GiB, "64 GiB": 64 * GiB, "1 TiB": TiB}
DATA = "4 GiB (1 GiB data)"
DATA_SIZE = 4 * GiB  # import_speed.make_source's image


def create_start(c: Client, name: str, disk: str) -> tuple[float, float]:
    """(create seconds, start seconds) through the SDK, until running."""
    with timer() as created:
        c.vms.create(name, disks=[f"{disk},storage=tmp"], memory_mib=64)
    with timer() as started:
        vm = c.vms.start(name)
    if vm.state != "running":
        raise RuntimeError(f"{name} is {vm.state} after start")
    return created(), started()


def run(quick: bool) -> list[Row]:
    rounds = 1 if quick else 3
    thinair: dict[str, list[float]] = {}
    starts: dict[str, list[float]] = {}
    copy_first: dict[str, list[float]] = {}
    copies: dict[str, list[float]] = {}
    with Lab("running") as lab:
        c = lab.client()
        images: dict[str, tuple[Path, int]] = {}
        for label, size in SPARSE.items():
            path = lab.path(f"sparse-{size}.raw")
            write_image(path, size, [(0, MiB), (size - MiB, MiB)])
            images[label] = (path, size)
        images[DATA] = (lab.path("data.raw"), DATA_SIZE)
        make_source(images[DATA][0])
        for round_no in range(rounds):
            for label, (image, size) in images.items():
                server = lab.export(image)
                name = lab.vm_name(f"thin{round_no}-{size >> 30}g")
                create_s, start_s = create_start(c, name, server.url)
                lab.remove_vm(name)
                thinair.setdefault(label, []).append(create_s + start_s)
                starts.setdefault(label, []).append(start_s)

                out = lab.path("copy")
                out.mkdir(mode=0o755, exist_ok=True)
                with timer() as copied:
                    local = run_nbdcopy(server, out, size)
                local.chmod(0o644)
                lab.unexport(server)
                name = lab.vm_name(f"copy{round_no}-{size >> 30}g")
                create_s, start_s = create_start(c, name, str(local))
                lab.remove_vm(name)
                local.unlink()
                copies.setdefault(label, []).append(copied())
                copy_first.setdefault(label, []).append(copied() + create_s + start_s)
                log(
                    f"{label}: thinair {thinair[label][-1]:.2f} s "
                    f"(start {starts[label][-1]:.2f} s), copy first "
                    f"{copy_first[label][-1]:.2f} s (copy {copied():.2f} s)"
                )
    rows = [
        Row(
            f"time to running, {label}: thinair (x copy first)",
            median(thinair[label]),
            "s",
            reference=median(copy_first[label]),
            detail={
                "thinair": thinair[label],
                "start": starts[label],
                "copy_first": copy_first[label],
                "copy": copies[label],
            },
        )
        for label in images
    ]
    flat = median(thinair["1 TiB"]) / median(thinair["1 GiB"])
    rows.append(
        Row(
            "time to running, thinair: 1 TiB (x 1 GiB)",
            median(thinair["1 TiB"]),
            "s",
            reference=median(thinair["1 GiB"]),
            target="ratio <= 1.5",
            met=flat <= 1.5,
        )
    )
    worst = max(max(v) for v in starts.values())
    rows.append(
        Row(
            "start call to running, slowest of all disks",
            worst,
            "s",
            target="< 1 s",
            met=worst < 1.0,
            detail={label: v for label, v in starts.items()},
        )
    )
    return rows


if __name__ == "__main__":
    bench_main("time_to_running", run, __doc__)
