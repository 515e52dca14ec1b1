"""Import copy speed against the tools a user would run instead, in one run.

A 4 GiB raw image holding 1 GiB of random data (16 extents of 64 MiB) is served
read-only by nbdkit with its stats filter (which counts the bytes each client
reads). Each round copies the same export with:
  - nbdcopy to a local raw file (the reference),
  - qemu-img convert -W -m 16 to qcow2,
  - thinair vm import --strategy mirror, the VM running on its temporary disk,
  - thinair vm import --strategy stream, likewise,
and reports, per method: seconds, speed as a ratio of nbdcopy's in the same
round, bytes read from the source against the allocated bytes, and the final
volume's allocation. Results are appended to bench/results/history.jsonl.

    .venv/bin/python bench/import_speed.py [--rounds 2]

bench/run.py calls run() (table rows) and the other benchmarks reuse Source,
make_source, allocated and run_nbdcopy.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import Lab, Row  # noqa: E402

GiB = 2**30
MiB = 2**20
SIZE = 4 * GiB
EXTENT = 64 * MiB
EXTENTS = 16  # 1 GiB of data
RESULTS = ROOT / "bench" / "results" / "history.jsonl"


def make_source(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(SIZE)
        stride = SIZE // EXTENTS
        for i in range(EXTENTS):
            f.seek(i * stride)
            for _ in range(EXTENT // MiB):
                f.write(os.urandom(MiB))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Source:
    """nbdkit serving the image read-only, counting what is read."""

    def __init__(self, image: Path, workdir: Path) -> None:
        self.image = image
        self.stats = workdir / f"stats-{uuid.uuid4().hex[:6]}.txt"
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                "nbdkit",
                "-r",
                "-f",
                "--exit-with-parent",
                "-i",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-t",
                "16",
                "--filter=stats",
                "file",
                str(image),
                f"statsfile={self.stats}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("nbdkit did not start") from None
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def stop(self) -> int:
        """Stop the server; the bytes clients read from it."""
        self.proc.terminate()
        self.proc.wait(10)
        text = self.stats.read_text() if self.stats.exists() else ""
        if not text:
            return -1
        match = re.search(
            r"^read: \d+ ops, [\d.]+ s, ([\d.]+) (bytes|KiB|MiB|GiB|TiB)", text, re.MULTILINE
        )
        if not match:
            return 0  # no read line: nothing was read
        value, unit = float(match.group(1)), match.group(2)
        scale = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[unit]
        return int(value * scale)


class Export(Protocol):
    """Anything serving an image at an NBD URL (Source, qemu_nbd.Server)."""

    @property
    def url(self) -> str: ...


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def timed(fn: Callable[[], Path]) -> tuple[float, Path]:
    began = time.monotonic()
    out = fn()
    return time.monotonic() - began, out


def run_nbdcopy(src: Export, out_dir: Path, size: int = SIZE) -> Path:
    dest = out_dir / "nbdcopy.raw"
    with open(dest, "wb") as f:
        f.truncate(size)
    subprocess.run(["nbdcopy", src.url, str(dest)], check=True)
    subprocess.run(["sync", str(dest)], check=True)
    return dest


def run_convert(src: Source, out_dir: Path) -> Path:
    dest = out_dir / "convert.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-W", "-m", "16", "-f", "raw", "-O", "qcow2", src.url, str(dest)],
        check=True,
    )
    subprocess.run(["sync", str(dest)], check=True)
    return dest


def thinair_import(lab: Lab, strategy: str) -> Callable[[Source, Path], Path]:
    def run(src: Source, out_dir: Path) -> Path:
        c = lab.client()
        name = lab.vm_name(f"{strategy}-{uuid.uuid4().hex[:4]}")
        home = "final" if strategy == "stream" else "tmp"
        c.vms.create(name, disks=[f"{src.url},format=raw,storage={home}"], memory_mib=128)
        c.vms.start(name)  # nothing bootable: the domain runs, which is all a copy needs
        job = c.vms.import_(name, to="final", strategy=strategy)
        final = c.jobs.wait(job.id)
        if final.state != "succeeded":
            raise RuntimeError(f"{strategy} import {final.state}: {final.error}")
        vm = c.vms.get(name)
        path = Path(vm.disks[0].volume_path)
        c.vms.stop(name, force=True)
        kept = out_dir / f"{strategy}.qcow2"
        os.link(path, kept)  # keep the volume for comparison after the VM is removed
        c.vms.remove(name)
        return kept

    return run


def measure(rounds: int) -> list[dict[str, Any]]:
    """Run the rounds; the per-method summary (medians over rounds)."""
    rows: list[dict[str, object]] = []
    # The Lab (bench/common.py) owns the work directory, the engine with storage
    # domains tmp and final, and removes every VM and domain on the way out.
    with Lab("import") as lab:
        work = lab.dir
        image = work / "source.raw"
        make_source(image)
        source_alloc = allocated(image)
        methods: dict[str, Callable[[Source, Path], Path]] = {
            "nbdcopy": run_nbdcopy,
            "qemu-img convert": run_convert,
            "thinair mirror": thinair_import(lab, "mirror"),
            "thinair stream": thinair_import(lab, "stream"),
        }
        for round_no in range(rounds):
            reference = None
            for method, fn in methods.items():
                out_dir = work / f"out-{round_no}"
                out_dir.mkdir(exist_ok=True, mode=0o755)
                src = Source(image, work)
                try:
                    seconds, dest = timed(functools.partial(fn, src, out_dir))
                finally:
                    read = src.stop()
                same = (
                    subprocess.run(
                        ["qemu-img", "compare", "-q", "-f", "raw", str(image), str(dest)]
                    ).returncode
                    == 0
                )
                if method == "nbdcopy":
                    reference = seconds
                rows.append(
                    {
                        "round": round_no,
                        "method": method,
                        "seconds": round(seconds, 2),
                        "ratio": round(reference / seconds, 2) if reference else None,
                        "read_ratio": round(read / source_alloc, 3) if read >= 0 else None,
                        "final_alloc_ratio": round(allocated(dest) / source_alloc, 3),
                        "identical": same,
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                dest.unlink()

    summary = []
    for name in dict.fromkeys(str(r["method"]) for r in rows):
        mine = [r for r in rows if r["method"] == name]
        entry = {
            "method": name,
            "seconds": statistics.median(float(r["seconds"]) for r in mine),  # type: ignore[arg-type]
            "ratio": statistics.median(float(r["ratio"]) for r in mine),  # type: ignore[arg-type]
            "read_ratio": mine[-1]["read_ratio"],
            "final_alloc_ratio": mine[-1]["final_alloc_ratio"],
            "identical": all(r["identical"] for r in mine),
        }
        summary.append(entry)
    return summary


def run(quick: bool) -> list[Row]:
    """The table rows: each method's seconds against nbdcopy's in the same rounds,
    and what the thinair imports read from the source against what it holds."""
    summary = measure(1 if quick else 2)
    ref = next(float(e["seconds"]) for e in summary if e["method"] == "nbdcopy")
    rows = []
    for e in summary:
        if e["method"] == "nbdcopy":
            continue
        rows.append(
            Row(
                f"import 1 GiB data: {e['method']} (time x nbdcopy)",
                float(e["seconds"]),
                "s",
                reference=ref,
                detail=e,
            )
        )
    for e in summary:
        if e["method"].startswith("thinair") and e["read_ratio"] is not None:
            rows.append(
                Row(
                    f"{e['method']}: bytes read / allocated",
                    float(e["read_ratio"]),
                    "x",
                    detail={"identical": e["identical"]},
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    summary = measure(args.rounds)
    print(
        f"\n{'method':18} {'seconds':>8} {'x nbdcopy':>10} {'read/alloc':>11} "
        f"{'final/alloc':>12}  identical"
    )
    for entry in summary:
        print(
            f"{entry['method']:18} {entry['seconds']:8.2f} {entry['ratio']:10.2f} "
            f"{entry['read_ratio']!s:>11} {entry['final_alloc_ratio']!s:>12}  "
            f"{entry['identical']}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(
            json.dumps(
                {
                    "bench": "import_speed",
                    "time": time.time(),
                    "rounds": args.rounds,
                    "summary": summary,
                }
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
