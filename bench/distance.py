"""Distance: time from `vm start` to the guest's boot marker with a delay added
to every read request of the source, against the same source with none.

The source is the test guest image served read-only by nbdkit over TCP behind
its delay filter (`rdelay=N ms`: the requests stay parallel, as over a WAN; this
kernel has no sch_netem). Each VM gets a new bridge, so nothing is cached when it
starts. Variants of the bridge (the engine's settings):
  default      a cache of what was read, in 1 MiB blocks, and the engine's
               readahead of sequential runs (thinair.engine.readahead)
  no-readahead the cache alone (THINAIR_BRIDGE_READAHEAD=off)
  passthrough  every read passed through (THINAIR_BRIDGE_CACHE=off), as before
The machine is shared and its load only ever adds time: every figure is the
best of its runs, as is the reference. Figures: start to THINAIR-BOOT-OK at 10,
25 and 50 ms against 0 ms (default bridge); targets <= 1.3x at 25 ms, <= 1.6x at 50 ms. The
other variants are shown at 25 and 50 ms against the same reference. At 25 ms,
with THINAIR_WORKING_SET=on, two VMs boot in turn from one source: the second
one's bridge prefetches the first one's boot working set (target <= 1.1x the
local-source boot: a copy of the image in a local file, no NBD, booted in every
round; the 0 ms NBD boot gets no readahead, its misses being too quick, and was
at times slower than the delayed boots).

    .venv/bin/python bench/distance.py [--quick]
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from boot_marker import boot  # noqa: E402
from common import Lab, Row, bench_main, guest_image, log  # noqa: E402

from tests.support.far_source import FarSource  # noqa: E402

VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "no-readahead": {"THINAIR_BRIDGE_READAHEAD": "off"},
    "passthrough": {"THINAIR_BRIDGE_CACHE": "off"},
    "working-set": {"THINAIR_WORKING_SET": "on"},
}
DELAYS = {
    "default": [0, 10, 25, 50],
    "no-readahead": [25, 50],
    "passthrough": [25, 50],
    "working-set": [25],
}
TARGETS = {("default", 25): 1.3, ("default", 50): 1.6, ("second VM", 25): 1.1}


def _boot_local(lab: Lab, round_no: int) -> float:
    """Start to boot marker from a local copy of the image (no NBD, no bridge)."""
    local = lab.path("guest-local.raw")
    if not local.exists():
        shutil.copyfile(guest_image(), local)
        local.chmod(0o644)
    name = lab.vm_name(f"local-{round_no}")
    took = boot(lab, name, str(local))
    lab.remove_vm(name)
    since_start = took["boot_ok"] - took["create"]
    log(f"local file, VM 1: start to boot marker {since_start:.2f} s")
    return since_start


def _boot_once(lab: Lab, variant: str, delay: int, round_no: int, vms: int = 1) -> list[float]:
    """Boot `vms` VMs in turn from one new source; start to boot marker of each."""
    pid_file = lab.path(f"source-{variant}-{delay}.pid")
    times = []
    with FarSource(guest_image(), pid_file, delay_ms=delay) as source:
        for n in range(vms):
            name = lab.vm_name(f"{variant}{delay}-{round_no}-{n}")
            took = boot(lab, name, source.url)
            lab.remove_vm(name)  # its bridge keeps the source's working set
            # boot() times from its create call; the start began when the create returned.
            since_start = took["boot_ok"] - took["create"]
            log(
                f"{variant} {delay} ms, VM {n + 1}: start to boot marker {since_start:.2f} s "
                f"(pattern read {took['pattern'] - took['create']:.2f} s)"
            )
            times.append(since_start)
    return times


def run(quick: bool) -> list[Row]:
    rounds = 1 if quick else 3
    times: dict[tuple[str, int], list[float]] = {}
    with contextlib.ExitStack() as stack:
        labs = {}
        for variant, env in VARIANTS.items():
            lab = Lab(f"distance-{variant}")
            lab.engine.extra_env.update(env)
            labs[variant] = stack.enter_context(lab)
        # Interleaved, so that the machine's load (other work on it) spreads
        # over every variant and delay alike.
        for round_no in range(rounds):
            times.setdefault(("local file", 0), []).append(_boot_local(labs["default"], round_no))
            for variant, delays in DELAYS.items():
                for delay in delays:
                    if variant == "working-set":  # its first VM: the default bridge's
                        first, second = _boot_once(labs[variant], variant, delay, round_no, 2)
                        times.setdefault(("default", delay), []).append(first)
                        times.setdefault(("second VM", delay), []).append(second)
                        continue
                    took = _boot_once(labs[variant], variant, delay, round_no)
                    times.setdefault((variant, delay), []).append(took[0])
    rows = []
    for (variant, delay), values in times.items():
        if delay == 0:
            continue
        value = min(values)
        target = TARGETS.get((variant, delay))
        against = ("local file", 0) if variant == "second VM" else ("default", 0)
        reference = min(times[against])
        what = "second VM, working set known" if variant == "second VM" else f"{variant} bridge"
        rows.append(
            Row(
                f"start to boot marker, {delay} ms/request, {what}"
                f" (x {'local file' if variant == 'second VM' else '0 ms'})",
                value,
                "s",
                reference=reference,
                target=f"<= {target}x" if target else "",
                met=value / reference <= target if target else None,
                detail={
                    "runs": values,
                    "reference_runs": times[against],
                    "nbd_0ms_runs": times[("default", 0)],
                    "local_file_runs": times[("local file", 0)],
                },
            )
        )
    return rows


if __name__ == "__main__":
    bench_main("distance", run, __doc__)
