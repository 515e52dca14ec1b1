#!/usr/bin/env python3
"""Run a VM out of thin air, then keep it or discard it: the seed's SDK demo.

    examples/quick_import.py nbd://host/export [URL...] --name web1 --to final \
        [--memory 512] [--keep | --discard]

Creates a VM whose disks are temporary overlays (on the storage domain --to) of
the given external disks, starts it and prints how long that took; then, with
--keep (the default), imports the disks while the VM runs, printing progress,
or with --discard rolls everything back. Uses the thinair SDK only: the engine
is found at THINAIR_URL with THINAIR_TOKEN, or the local engine's token.
"""

from __future__ import annotations

import argparse
import sys
import time

import thinair


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", nargs="+", help="external disks, as QEMU reads them")
    parser.add_argument("--name", required=True)
    parser.add_argument("--to", required=True, help="storage domain for the disks")
    parser.add_argument("--memory", type=int, default=512, help="MiB")
    keep = parser.add_mutually_exclusive_group()
    keep.add_argument("--keep", dest="keep", action="store_true", default=True)
    keep.add_argument("--discard", dest="keep", action="store_false")
    args = parser.parse_args()

    client = thinair.Client()
    try:
        began = time.monotonic()
        vm = client.vms.create(
            args.name, disks=[f"{u},storage={args.to}" for u in args.urls], memory_mib=args.memory
        )
        vm = vm.start()
        print(f"{vm.name} is {vm.state} {time.monotonic() - began:.1f} s after the request")
        if not args.keep:
            vm.rollback()
            print(f"{vm.name} discarded: its temporary disks are gone, the sources untouched")
            return 0

        def show(job: thinair.Job) -> None:
            done, total = job.progress.get("done", 0), job.progress.get("total") or 1
            rate = job.progress.get("rate", 0) / 2**20
            print(
                f"\r{job.step or job.state:12} {100 * done / total:5.1f}%  {rate:7.1f} MiB/s",
                end="",
                flush=True,
            )

        job = vm.import_(to=args.to).wait(progress=show)
        print()
        if job.state != "succeeded":
            print(f"import {job.state}: {job.error}", file=sys.stderr)
            return 1
        disks = ", ".join(f"{d.target}: {d.volume_path}" for d in vm.refresh().disks)
        print(f"{vm.name} runs on local storage only ({disks})")
        return 0
    except thinair.ThinairAPIError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
