"""Run every benchmark in one process; print one table; append one history line.

Each figure is measured against its reference in the same run and shown as a
ratio (value / reference), with its target where it has one. The benchmarks,
in order (each also runs alone as bench/<name>.py):
  1. time_to_running     thinair create+start vs copy first, 1 GiB to 1 TiB
  2. boot_marker         create to the guest's boot marker, NBD vs local file
  3. import_speed        import copy speed vs nbdcopy and qemu-img convert
  4. read_during_import  VM disk read speed during an import vs after it
  5. pivot_pause         the guest's largest write gap across a mirror's switch-over
  6. concurrency         1, 4, 16 rollbacks and imports at once
  7. api_latency         GET /api/v1/vms (all, and a page) with 1,000 and 10,000
                         VMs, p50 and p99
  8. distance            start to boot marker with 10/25/50 ms per read vs none
                         (about 9 min alone, 3 with --quick)
  9. far_reads           the guest's read latency during an import on a 100 Mbit/s
                         link vs before it, and while the prefetch runs vs off;
                         its read throughput at 25 ms vs none, uncached and
                         prefetched; bytes read over boot + prefetch + import vs
                         allocated (about 14 min alone, 6 with --quick)
A benchmark that fails is reported in the table (and the exit status); the
others still run. One JSON line per run goes to bench/results/history.jsonl.

    .venv/bin/python bench/run.py [--quick] [--only NAME,...]

--quick (one round each) took 5.6 min here and the default (2-3 rounds per
figure) 11 min, on 2 cores with TCG guests.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import api_latency  # noqa: E402
import boot_marker  # noqa: E402
import concurrency  # noqa: E402
import distance  # noqa: E402
import far_reads  # noqa: E402
import import_speed  # noqa: E402
import pivot_pause  # noqa: E402
import read_during_import  # noqa: E402
import time_to_running  # noqa: E402
from common import ROOT, Row, append_history, log, print_table  # noqa: E402

BENCHES: dict[str, Callable[[bool], list[Row]]] = {
    "time_to_running": time_to_running.run,
    "boot_marker": boot_marker.run,
    "import_speed": import_speed.run,
    "read_during_import": read_during_import.run,
    "pivot_pause": pivot_pause.run,
    "concurrency": concurrency.run,
    "api_latency": api_latency.run,
    "distance": distance.run,
    "far_reads": far_reads.run,
}


def commit() -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round each (< ~10 min)")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHES)
    unknown = set(names) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")

    rows: list[Row] = []
    seconds: dict[str, float] = {}
    failed: list[str] = []
    began = time.monotonic()
    for name in names:
        log(f"== {name}")
        started = time.monotonic()
        try:
            rows += BENCHES[name](args.quick)
        except Exception as e:
            traceback.print_exc()
            failed.append(name)
            rows.append(Row(f"{name}: FAILED ({type(e).__name__}: {e})"[:90], 0.0, "", met=False))
        seconds[name] = round(time.monotonic() - started, 1)
        log(f"== {name}: {seconds[name]} s")
    total = time.monotonic() - began
    print()
    print_table(rows)
    met = [r.met for r in rows if r.met is not None]
    unmeasured = [r.figure for r in rows if r.target and r.met is None]
    print(
        f"\n{sum(met)} of {len(met)} targets met; {len(unmeasured)} target(s) not measured "
        f"in this run; {len(failed)} benchmark(s) failed; "
        f"{total / 60:.1f} min ({'quick' if args.quick else 'full'} run)"
    )
    append_history(
        "run",
        rows,
        quick=args.quick,
        commit=commit(),
        seconds=seconds,
        total_seconds=round(total, 1),
        failed=failed,
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
