"""qemu-img: probe images, create overlays, compare, convert.

Plain functions building argv lists; the binary can be overridden with
THINAIR_QEMU_IMG.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from thinair.adapters._process import CommandFailed, run


def binary() -> str:
    return os.environ.get("THINAIR_QEMU_IMG", "qemu-img")


@dataclass(frozen=True)
class ImageInfo:
    format: str
    virtual_size: int
    actual_size: int | None
    backing_filename: str | None
    raw: dict[str, Any]
    chain: list[dict[str, Any]]  # every layer, top first (one unless backing_chain)

    def files(self) -> list[str]:
        """Every file QEMU opens to read the image: each layer, a VMDK's extents
        and a qcow2's external data file."""
        names = []
        for layer in self.chain:
            names.append(layer["filename"])
            data = layer.get("format-specific", {}).get("data", {})
            names += [extent["filename"] for extent in data.get("extents", [])]
            if data.get("data-file"):
                names.append(data["data-file"])
        return names


def info(
    filename: str, fmt: str | None = None, timeout: float | None = None, backing_chain: bool = False
) -> ImageInfo:
    argv = [binary(), "info", "--output=json"]
    if fmt:
        argv += ["-f", fmt]
    if backing_chain:
        argv.append("--backing-chain")
    argv.append(filename)
    data = json.loads(run(argv, timeout=timeout))
    chain = data if isinstance(data, list) else [data]
    top = chain[0]
    return ImageInfo(
        format=top["format"],
        virtual_size=int(top["virtual-size"]),
        actual_size=top.get("actual-size"),
        backing_filename=top.get("backing-filename"),
        raw=top,
        chain=chain,
    )


def create_overlay(path: str, backing: str, backing_format: str, size: int) -> None:
    """A qcow2 overlay on `backing`. The size is given (-u) so the backing is not
    opened again: it was probed already, and some NBD servers take one client only."""
    run(
        [
            binary(),
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            backing,
            "-F",
            backing_format,
            path,
            str(size),
        ]
    )


def create(path: str, fmt: str, size: int) -> None:
    run([binary(), "create", "-q", "-f", fmt, path, str(size)])


def compare(
    a: str, b: str, a_format: str | None = None, b_format: str | None = None, strict: bool = False
) -> bool:
    """True if the images hold the same data (qemu-img compare exits 1 when they differ)."""
    argv = [binary(), "compare", "-q"]
    if a_format:
        argv += ["-f", a_format]
    if b_format:
        argv += ["-F", b_format]
    if strict:
        argv.append("-s")
    argv += [a, b]
    try:
        run(argv)
    except CommandFailed as e:
        if e.returncode == 1:
            return False
        raise
    return True


def measure(qcow2_path: str, out_fmt: str) -> int:
    """Bytes a copy of the image's whole chain needs in `out_fmt`. Reads the
    allocation map only, and without taking the image's lock, so it works on the
    disk of a running VM."""
    opts = f"driver=qcow2,file.driver=file,file.filename={qcow2_path},file.locking=off"
    out = run([binary(), "measure", "--output=json", "-O", out_fmt, "--image-opts", opts])
    return int(json.loads(out)["required"])


def zero_ranges(filename: str, fmt: str, timeout: float | None = None) -> list[tuple[int, int]]:
    """(offset, length) of the ranges that read as zeros, from the image's
    allocation map (NBD block status for a remote disk)."""
    out = run([binary(), "map", "--output=json", "-f", fmt, filename], timeout=timeout)
    ranges: list[tuple[int, int]] = []
    for extent in json.loads(out):
        if extent.get("zero") and not extent.get("data"):
            start, length = int(extent["start"]), int(extent["length"])
            if ranges and ranges[-1][0] + ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
            else:
                ranges.append((start, length))
    return ranges
