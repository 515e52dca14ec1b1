"""The guest's reads from a source far away: over a thin link during an import,
and their throughput over a slow one before any import.

The source is a raw image full of random data served read-only by nbdkit over
TCP (tests/support/far_source.py), behind its rate filter (one token bucket for
every connection: a shared link) or its delay filter (a delay per read request,
requests parallel). The VM runs (nothing bootable) on its temporary disk, read
through the engine's bridge (its default cache: 1 MiB blocks). The guest cannot
be told to read, so reads are made inside the VM's own QEMU, on the guest's
virtio drive (HMP `qemu-io -d <drive>`, as bench/read_during_import.py does):
the same block backend, overlay and bridge the guest's reads go through; each
read is timed from outside (the libvirt round trip adds ~5 ms). Every read is at
an offset never read before (its own 1 MiB block), so it crosses the link.

Figures:
  - thin link (rate=100M, burstiness=0.02: a token bucket with a 2 s burst,
    the filter's default, would send a 1 MiB read after a pause at once, which
    no real link does): the latency of 4 KiB reads made every 0.2-0.5 s,
    p50 and p99 over the reads of every round, during an import (`vm import`,
    bulk copier) against before it (target p99 <= 2x); the import's time is in
    the row's detail.
  - the test guest booted from a source 25 ms away, its disk prefetched by the
    engine (the default), then imported: bytes the source sent over the three
    against the image's allocated bytes (target <= 1.1x: nothing fetched
    twice).
  - the same link, reads every 0.5-1.5 s from the VM's start: their latency
    (p50, p99) with the engine's prefetch running in the gaps against with it
    off (report), and what the source sent meanwhile.
  - 25 ms per read request against none: uncached random 4 KiB reads (one at a
    time) and sequential 1 MiB reads (one at a time, from offset 0), MiB/s
    (report both; target sequential >= 0.5x); the same random reads once the
    engine's prefetch has fetched the disk (report).
The rows of uncached reads and of the thin link are measured with the
prefetch off (THINAIR_BRIDGE_PREFETCH=off): it would make the reads hits.

    .venv/bin/python bench/far_reads.py [--quick]
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import libvirt  # noqa: E402
from boot_marker import boot  # noqa: E402
from common import (  # noqa: E402
    KiB,
    Lab,
    MiB,
    Row,
    bench_main,
    guest_image,
    log,
    percentile,
    read_seconds,
    write_image,
)

from tests.support.far_source import FarSource, reads  # noqa: E402

DISK_SIZE = 512 * MiB
BLOCK = MiB  # the bridge's cache block: one read per block is a miss
LINK = "100M"
BURST = 0.02  # seconds of LINK sent at once after a pause (a real link has ~none)
BEFORE_READS = 40
PREFETCH_READS = 40


def _vm(lab: Lab, url: str, what: str) -> tuple[str, libvirt.virConnect, libvirt.virDomain]:
    c = lab.client()
    name = lab.vm_name(what)
    c.vms.create(name, disks=[f"{url},format=raw,storage=tmp"], memory_mib=64)
    c.vms.start(name)
    conn = libvirt.open("qemu:///system")
    return name, conn, conn.lookupByName(name)


def thin_link(lab: Lab, image: Path, round_no: int) -> dict[str, list[float]]:
    """4 KiB reads at fresh blocks before and during an import over LINK."""
    rng = random.Random(round_no)
    blocks = list(range(DISK_SIZE // BLOCK))
    rng.shuffle(blocks)
    pid_file = lab.path(f"thin-{round_no}.pid")
    with FarSource(image, pid_file, rate=LINK, burst=BURST) as source:
        name, conn, dom = _vm(lab, source.url, f"thin{round_no}")
        c = lab.client()
        try:
            before = []
            for _ in range(BEFORE_READS):
                before.append(read_seconds(dom, blocks.pop() * BLOCK, 4 * KiB))
                time.sleep(rng.uniform(0.2, 0.5))
            began = time.monotonic()
            job = c.vms.import_(name, to="final")
            during = []
            while blocks:
                state = c.jobs.get(job.id)
                if state.state not in ("pending", "running"):
                    break
                if not state.step.startswith("copy"):
                    time.sleep(0.05)
                    continue
                took = read_seconds(dom, blocks.pop() * BLOCK, 4 * KiB)
                if c.jobs.get(job.id).step.startswith("copy"):
                    during.append(took)
                time.sleep(rng.uniform(0.2, 0.5))
            final = c.jobs.wait(job.id, timeout=900)
            if final.state != "succeeded":
                raise RuntimeError(f"import {final.state}: {final.error}")
            took_import = time.monotonic() - began
        finally:
            conn.close()
            lab.remove_vm(name)
    return {"before": before, "during": during, "import": [took_import]}


def while_prefetching(lab: Lab, image: Path, round_no: int) -> dict[str, list[float]]:
    """4 KiB reads at fresh blocks over LINK, one every 0.5-1.5 s (the prefetch
    reads in the gaps longer than 0.5 s), from the VM's start on; with the
    prefetch on (the lab's engine) or off. Also the MiB the source sent."""
    rng = random.Random(100 + round_no)
    blocks = list(range(DISK_SIZE // BLOCK))
    rng.shuffle(blocks)
    log_file = lab.path(f"pre-{round_no}.log")
    pid_file = lab.path(f"pre-{round_no}.pid")
    with FarSource(image, pid_file, rate=LINK, burst=BURST, log_file=log_file) as source:
        name, conn, dom = _vm(lab, source.url, f"pre{round_no}")
        try:
            took = []
            for _ in range(PREFETCH_READS):
                took.append(read_seconds(dom, blocks.pop() * BLOCK, 4 * KiB))
                time.sleep(rng.uniform(0.5, 1.5))
            sent = sum(n for _, n in reads(log_file)) / MiB
        finally:
            conn.close()
            lab.remove_vm(name)
    return {"reads": took, "sent_mib": [sent]}


def throughput(
    lab: Lab, image: Path, delay: int, round_no: int, prefetched: bool = False
) -> dict[str, float]:
    """MiB/s of one-at-a-time random 4 KiB and sequential 1 MiB reads; with
    `prefetched`, the random reads only, once the engine's prefetch has fetched
    the disk, and the prefetch's seconds."""
    rng = random.Random(round_no)
    half = DISK_SIZE // BLOCK // 2
    blocks = list(range(half, 2 * half))  # random reads in the upper half
    rng.shuffle(blocks)
    log_file = lab.path(f"d{delay}-{round_no}-{prefetched}.log")
    pid_file = lab.path(f"d{delay}-{round_no}.pid")
    with FarSource(image, pid_file, delay_ms=delay, log_file=log_file) as source:
        name, conn, dom = _vm(lab, source.url, f"d{delay}r{round_no}")
        began = time.monotonic()
        try:
            while prefetched and sum(n for _, n in reads(log_file)) < DISK_SIZE:
                if time.monotonic() - began > 300:
                    raise RuntimeError("the prefetch did not fetch the disk in 300 s")
                time.sleep(0.1)
            took = time.monotonic() - began
            rand = [read_seconds(dom, b * BLOCK, 4 * KiB) for b in blocks[:64]]
            if prefetched:
                return {"random": 64 * 4 * KiB / MiB / sum(rand), "prefetch_s": took}
            seq = [read_seconds(dom, i * MiB, MiB) for i in range(64)]  # the lower half
        finally:
            conn.close()
            lab.remove_vm(name)
    return {"random": 64 * 4 * KiB / MiB / sum(rand), "sequential": 64 / sum(seq)}


def bytes_read(lab: Lab, round_no: int) -> dict[str, float]:
    """The test guest booted from a source 25 ms away (to its pattern marker: it
    has read its boot files and 64 MiB more), its disk prefetched (the rest of
    its data: 2 s of a quiet link), then imported: bytes the source sent over
    all three, against the image's allocated bytes."""
    image = guest_image()
    log_file = lab.path(f"bytes-{round_no}.log")
    pid_file = lab.path(f"bytes-{round_no}.pid")
    with FarSource(image, pid_file, delay_ms=25, log_file=log_file) as source:
        name = lab.vm_name(f"bytes{round_no}")
        boot(lab, name, source.url)
        booted = sum(n for _, n in reads(log_file))
        time.sleep(2)
        c = lab.client()
        try:
            final = c.vms.import_(name, to="final").wait(timeout=600)
            if final.state != "succeeded":
                raise RuntimeError(f"import {final.state}: {final.error}")
        finally:
            lab.remove_vm(name)
        total = sum(n for _, n in reads(log_file))
    return {"boot": booted, "total": total, "allocated": image.stat().st_blocks * 512}


def run(quick: bool) -> list[Row]:
    rounds = 1 if quick else 3
    thin: dict[str, list[float]] = {"before": [], "during": [], "import": []}
    rates: dict[tuple[int, str], list[float]] = {}
    read: list[dict[str, float]] = []
    with contextlib.ExitStack() as stack:
        lab = Lab("far-reads")
        lab.engine.extra_env["THINAIR_BRIDGE_PREFETCH"] = "off"
        lab = stack.enter_context(lab)
        default = stack.enter_context(Lab("far-reads-default"))
        image = lab.path("data.raw")
        write_image(image, DISK_SIZE, [(0, DISK_SIZE)])
        for round_no in range(rounds):
            for delay, prefetched in ((0, False), (25, False), (25, True)):
                got = throughput(default if prefetched else lab, image, delay, round_no, prefetched)
                log(
                    f"round {round_no} {delay} ms{', prefetched' if prefetched else ''}: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in got.items())
                )
                for kind, value in got.items():
                    key = f"{kind} prefetched" if prefetched else kind
                    rates.setdefault((delay, key), []).append(value)
        for round_no in range(rounds):
            lat = thin_link(lab, image, round_no)
            log(
                f"round {round_no} {LINK}bit/s: import {lat['import'][0]:.1f} s; "
                + ", ".join(
                    f"{k} p50 {percentile(v, 50) * 1000:.0f} ms"
                    f" p99 {percentile(v, 99) * 1000:.0f} ms ({len(v)} reads)"
                    for k, v in lat.items()
                    if k != "import" and v
                )
            )
            for k, v in lat.items():
                thin[k] += v
        quiet: dict[bool, dict[str, list[float]]] = {}
        for round_no in range(rounds):
            for on in (False, True):
                got_ = while_prefetching(default if on else lab, image, round_no)
                log(
                    f"round {round_no} {LINK}bit/s, prefetch {'on' if on else 'off'}: "
                    f"p50 {percentile(got_['reads'], 50) * 1000:.0f} ms, "
                    f"p99 {percentile(got_['reads'], 99) * 1000:.0f} ms, "
                    f"the source sent {got_['sent_mib'][0]:.0f} MiB"
                )
                for k, v in got_.items():
                    quiet.setdefault(on, {}).setdefault(k, []).extend(v)
        for round_no in range(rounds):
            counts = bytes_read(default, round_no)
            log(
                f"round {round_no}: boot read {counts['boot'] / MiB:.0f} MiB, boot and import "
                f"{counts['total'] / MiB:.0f} MiB, allocated {counts['allocated'] / MiB:.0f} MiB"
            )
            read.append(counts)
    rows = []
    best = min(read, key=lambda r: r["total"])
    rows.append(
        Row(
            "bytes read from the source, boot + prefetch + import, 25 ms (x allocated)",
            best["total"] / MiB,
            "MiB",
            reference=best["allocated"] / MiB,
            target="<= 1.1x",
            met=best["total"] / best["allocated"] <= 1.1,
            detail={"boot_mib": [round(r["boot"] / MiB) for r in read]},
        )
    )
    for kind, target in (("random", None), ("sequential", 0.5), ("random prefetched", None)):
        plain = kind.split()[0]  # its reference: the same reads, no delay
        value, reference = max(rates[(25, kind)]), max(rates[(0, plain)])
        size = "4 KiB" if plain == "random" else "1 MiB"
        detail: dict[str, object] = {"runs": rates[(25, kind)], "reference_runs": rates[(0, plain)]}
        if kind == "random prefetched":
            detail["prefetch_s"] = rates[(25, "prefetch_s prefetched")]
        rows.append(
            Row(
                f"guest {kind.replace(' prefetched', '')} {size} reads, 25 ms/request"
                f"{', disk prefetched' if kind.endswith('prefetched') else ''}, MiB/s (x none)",
                value,
                "MiB/s",
                reference=reference,
                target=f">= {target}x" if target else "",
                met=value / reference >= target if target else None,
                detail=detail,
            )
        )
    for p in (50, 99):
        value, reference = percentile(thin["during"], p), percentile(thin["before"], p)
        rows.append(
            Row(
                f"guest 4 KiB read p{p} during an import, {LINK}bit/s link (x before)",
                value * 1000,
                "ms",
                reference=reference * 1000,
                target="<= 2x" if p == 99 else "",
                met=value / reference <= 2 if p == 99 else None,
                detail={"reads": {k: len(v) for k, v in thin.items()}, "import_s": thin["import"]},
            )
        )
    for p in (50, 99):
        value, reference = percentile(quiet[True]["reads"], p), percentile(quiet[False]["reads"], p)
        rows.append(
            Row(
                f"guest 4 KiB read p{p} while the prefetch runs, {LINK}bit/s link (x off)",
                value * 1000,
                "ms",
                reference=reference * 1000,
                detail={
                    "sent_mib": quiet[True]["sent_mib"],
                    "off_sent_mib": quiet[False]["sent_mib"],
                },
            )
        )
    return rows


if __name__ == "__main__":
    bench_main("far_reads", run, __doc__)
