"""Read throughput of thinair exports against reading the file itself, in one run.

A 1 GiB file of random data (warm in the page cache, as a template served to
many VMs would be) is exposed by a thinair engine as plain NBD, NBD with TLS
(PSK and X.509) and HTTP. Each round reads the whole image with:
  - nbdcopy IMAGE null:            the file itself (the reference),
  - nbdcopy nbd://... null:        the plain export,
  - nbdcopy nbds://...psk null:    the TLS-PSK export,
  - nbdcopy nbds://...x509 null:   the TLS X.509 export,
  - curl -o /dev/null http://...   the HTTP export (nginx),
and prints, per method, the median seconds, MiB/s, and the speed as a fraction
of the reference's in the same run.

    .venv/bin/python bench/expose_throughput.py [--rounds 3] [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.engine import Engine  # noqa: E402

MiB = 2**20


def make_image(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    path.chmod(0o644)  # nginx's workers read it as nobody


def timed(argv: list[str]) -> float:
    began = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=600)
    return time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()

    work = Path("/var/tmp/thinair-bench") / uuid.uuid4().hex[:8]
    work.mkdir(parents=True, mode=0o755)
    os.chmod(work.parent, 0o755)
    engine = Engine(home=work / "home", libvirt_uri="test:///default")
    image = work / "random.raw"
    make_image(image, args.size_mib * MiB)
    subprocess.run(["cat", str(image)], check=True, stdout=subprocess.DEVNULL)  # warm the cache
    engine.start()
    c = engine.client()
    try:
        plain = c.exports.create(str(image), name="plain")
        psk = c.exports.create(str(image), name="psk", tls="psk")
        x509 = c.exports.create(str(image), name="x509", tls="x509")
        web = c.exports.create(str(image), name="web", protocol="http")
        methods = {
            "nbdcopy file": ["nbdcopy", str(image), "null:"],
            "nbdcopy nbd": ["nbdcopy", plain.url, "null:"],
            "nbdcopy nbds psk": ["nbdcopy", psk.url, "null:"],
            "nbdcopy nbds x509": ["nbdcopy", x509.url, "null:"],
            "curl http": ["curl", "-sf", "-o", "/dev/null", web.url],
        }
        seconds: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(args.rounds):
            for method, argv in methods.items():
                seconds[method].append(timed(argv))
        for e in (plain, psk, x509, web):
            c.exports.remove(e.id)
    finally:
        engine.stop()
        # Exports outlive the engine by design: stop what is left if a step failed.
        from tests.support.exports import stop_servers

        stop_servers(f"{work}/")
        shutil.rmtree(work, ignore_errors=True)

    reference = statistics.median(seconds["nbdcopy file"])
    print(
        f"\n{args.size_mib} MiB of random data, {args.rounds} rounds, medians; "
        "page cache warm; exports by qemu-nbd (cache=writeback, aio=threads) and nginx\n"
    )
    print(f"{'method':20} {'seconds':>8} {'MiB/s':>8} {'x file':>7}")
    for method, times in seconds.items():
        median = statistics.median(times)
        print(f"{method:20} {median:8.2f} {args.size_mib / median:8.0f} {reference / median:7.2f}")


if __name__ == "__main__":
    main()
