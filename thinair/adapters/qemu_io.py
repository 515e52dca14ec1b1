"""qemu-io: metadata-only edits of an image thinair owns.

Used on a new overlay, before any guest runs on it, to mark ranges as zero
clusters. The overlay is opened with no backing file (`backing=`), so the
external disk is not even opened. The binary can be overridden with
THINAIR_QEMU_IO.
"""

from __future__ import annotations

import os

from thinair.adapters._process import run

# qemu-io takes one -c per command; keep command lines well below ARG_MAX.
_BATCH = 512


def write_zeroes(qcow2_path: str, ranges: list[tuple[int, int]]) -> None:
    opts = f"driver=qcow2,file.driver=file,file.filename={qcow2_path},backing="
    commands = [f"write -z {offset} {length}" for offset, length in ranges]
    for i in range(0, len(commands), _BATCH):
        argv = [os.environ.get("THINAIR_QEMU_IO", "qemu-io"), "--image-opts"]
        for command in commands[i : i + _BATCH]:
            argv += ["-c", command]
        run([*argv, opts])  # with --image-opts, the options take the filename's place
