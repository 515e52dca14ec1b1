"""Distance: time from `vm start` to the guest's boot marker with a delay added
to every read request of the source, against the same source with none.

The source is the test guest image served read-only by nbdkit over TCP behind
its delay filter (`rdelay=N ms`: the requests stay parallel, as over a WAN; this
kernel has no sch_netem). Each VM gets a new bridge, so nothing is cached when it
starts. Variants of the bridge (the engine's settings):
  default      cache of what was read, in 1 MiB blocks, + readahead filter
  cache        the cache alone (THINAIR_BRIDGE_READAHEAD=off)
  passthrough  every read passed through (THINAIR_BRIDGE_CACHE=off), as before
Figures: start to THINAIR-BOOT-OK at 10, 25 and 50 ms against 0 ms (the best of
the 0 ms runs, default bridge); targets <= 1.3x at 25 ms, <= 1.6x at 50 ms. The
other variants are shown at 25 and 50 ms against the same reference.

    .venv/bin/python bench/distance.py [--quick]
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from boot_marker import boot  # noqa: E402
from common import Lab, Row, bench_main, guest_image, log, median  # noqa: E402

from tests.support.far_source import FarSource  # noqa: E402

VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "cache": {"THINAIR_BRIDGE_READAHEAD": "off"},
    "passthrough": {"THINAIR_BRIDGE_CACHE": "off"},
}
DELAYS = {"default": [0, 10, 25, 50], "cache": [25, 50], "passthrough": [25, 50]}
TARGETS = {25: 1.3, 50: 1.6}


def _boot_once(lab: Lab, variant: str, delay: int, round_no: int) -> float:
    pid_file = lab.path(f"source-{variant}-{delay}.pid")
    with FarSource(guest_image(), pid_file, delay_ms=delay) as source:
        name = lab.vm_name(f"{variant}{delay}-{round_no}")
        took = boot(lab, name, source.url)
        lab.remove_vm(name)
    # boot() times from its create call; the start began when the create returned.
    since_start = took["boot_ok"] - took["create"]
    log(
        f"{variant} {delay} ms: start to boot marker {since_start:.2f} s "
        f"(pattern read {took['pattern'] - took['create']:.2f} s)"
    )
    return since_start


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
            for variant, delays in DELAYS.items():
                for delay in delays:
                    took = _boot_once(labs[variant], variant, delay, round_no)
                    times.setdefault((variant, delay), []).append(took)
    reference = min(times[("default", 0)])
    rows = []
    for (variant, delay), values in times.items():
        if delay == 0:
            continue
        value = median(values)
        target = TARGETS.get(delay) if variant == "default" else None
        rows.append(
            Row(
                f"start to boot marker, {delay} ms/request, {variant} bridge (x 0 ms)",
                value,
                "s",
                reference=reference,
                target=f"<= {target}x" if target else "",
                met=value / reference <= target if target else None,
                detail={"runs": values, "reference_runs": times[("default", 0)]},
            )
        )
    return rows


if __name__ == "__main__":
    bench_main("distance", run, __doc__)
