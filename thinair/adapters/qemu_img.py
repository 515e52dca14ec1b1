"""qemu-img: probe images, create overlays, compare, convert.

Plain functions building argv lists; the binary can be overridden with
THINAIR_QEMU_IMG.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from thinair.adapters._process import CommandFailed, run

Progress = Callable[[float], None]  # the fraction done, 0.0 to 1.0
ShouldStop = Callable[[], bool]


class Stopped(Exception):
    """should_stop() said so; the command was terminated."""


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


def first_difference(a: str, b: str, a_format: str, b_format: str) -> int | None:
    """The offset of the first byte where two images differ, or None."""
    argv = [binary(), "compare", "-f", a_format, "-F", b_format, a, b]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return None
    if done.returncode != 1:
        raise CommandFailed(argv, done.returncode, done.stderr)
    # "Content mismatch at offset N!" (stdout)
    found = re.search(r"offset (\d+)", done.stdout)
    return int(found.group(1)) if found else 0


def measure(path: str, out_fmt: str, fmt: str = "qcow2") -> int:
    """Bytes a copy of the image's whole chain needs in `out_fmt`. Reads the
    allocation map only, and without taking the image's lock, so it works on the
    disk of a running VM."""
    opts = f"driver={fmt},file.driver=file,file.filename={path},file.locking=off"
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


_PROGRESS = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


def run_with_progress(
    argv: list[str], on_progress: Progress | None = None, should_stop: ShouldStop | None = None
) -> None:
    """Run a qemu-img command given -p, reporting its percentage as it goes;
    terminate it (and raise Stopped) when should_stop() says so."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None and proc.stderr is not None
    buf = b""
    try:
        while chunk := proc.stdout.read1(4096):  # type: ignore[attr-defined]
            buf = (buf + chunk)[-256:]
            found = _PROGRESS.findall(buf.decode(errors="replace"))
            if found and on_progress:
                on_progress(float(found[-1]) / 100)
            if should_stop and should_stop():
                proc.terminate()
                proc.wait()
                raise Stopped()
        stderr = proc.stderr.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, stderr)


def convert(
    src: str,
    dest: str,
    src_format: str,
    dest_format: str,
    bandwidth: int | None = None,
    on_progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> None:
    """Copy an image's whole chain into a new image (-W: writes out of order)."""
    argv = [binary(), "convert", "-p", "-f", src_format, "-O", dest_format, "-W", "-m", "8"]
    if bandwidth:
        argv += ["-r", str(bandwidth)]
    run_with_progress([*argv, src, dest], on_progress, should_stop)


def rebase(
    image: str,
    backing: str,
    backing_format: str,
    unsafe: bool = False,
    on_progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> None:
    """Point a qcow2 image at another backing file. `unsafe` (-u): only the
    header changes, for a backing that holds the same data (instant, so no
    progress); else qemu-img writes into the image what differs between the
    old backing and the new one."""
    if unsafe:
        run(
            [
                binary(),
                "rebase",
                "-q",
                "-u",
                "-f",
                "qcow2",
                "-b",
                backing,
                "-F",
                backing_format,
                image,
            ]
        )
        return
    argv = [binary(), "rebase", "-p", "-f", "qcow2", "-b", backing, "-F", backing_format, image]
    run_with_progress(argv, on_progress, should_stop)


def commit(
    image: str,
    on_progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    keep: bool = True,
    fmt: str | None = "qcow2",
) -> None:
    """Write a qcow2 image's own clusters into its backing file. With `keep`
    (-d) the image stays as it is, so that a commit interrupted can simply run
    again; without, qemu-img empties it."""
    argv = [binary(), "commit", "-p"]
    if keep:
        argv.append("-d")
    if fmt:
        argv += ["-f", fmt]
    run_with_progress([*argv, image], on_progress, should_stop)
