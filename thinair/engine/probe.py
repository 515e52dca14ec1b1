"""Asking an external disk's server what it holds, before anything is created."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from urllib.parse import urlsplit

from thinair.adapters import nbd_client, qemu_img
from thinair.adapters.errors import CommandFailed
from thinair.errors import ExternalDiskError
from thinair.external import DiskSpec, ExternalURL, parse_url


@dataclass(frozen=True)
class Probed:
    url: str
    format: str
    virtual_size: int
    read_only: bool | None  # None where the protocol cannot tell


def _qemu_img_reason(stderr: str, url: str) -> str:
    # qemu-img prefixes its messages with "qemu-img: Could not open '...': ";
    # keep the last, most specific part, and the name when it is another file
    # of the image (a backing file or an extent).
    line = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
    if m := re.match(r"qemu-img: Could not open '([^']*)': (.*)", line):
        name, reason = m.groups()
        return reason if name == url else f"{name} (named by the image): {reason}"
    return line.split(": ", 2)[-1] if line.startswith("qemu-img:") else line


def local_image_problem(path: str) -> str | None:
    """Why a local path cannot be used as an image, or None if it can."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot use {path}: {e.strerror}"
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        return f"{path} is not a file or a block device"
    return None


def check_files(
    ext: ExternalURL, info: qemu_img.ImageInfo, confine: Callable[[str], None] | None = None
) -> None:
    """Refuse a remote image that makes QEMU open anything but the server's own
    files: a qcow2 backing file, a VMDK extent or a data file is resolved by QEMU
    on this host, so a remote image naming `/etc/shadow` (or another server)
    would have QEMU read it. Relative names resolve against the URL: a qcow2
    chain or a VMDK descriptor with its extents beside it on one HTTP server is
    fine. An NBD export or a tar member is one image, so anything else named is
    refused (QEMU would resolve it on this host, not in the export or tar).
    A local image's own files (its backing chain, extents, data file) go through
    `confine`, the image roots' check: a qcow2 under the roots naming
    /etc/shadow as its backing file is refused like /etc/shadow itself."""
    if ext.is_local:
        for name in info.files():
            if not name.startswith("/"):
                raise ExternalDiskError(
                    f"{ext.url} names {name!r} (a backing file or extent) that is not a "
                    "local path; flatten it with qemu-img convert"
                )
            if confine is not None:
                confine(name)
        return
    top = info.chain[0]["filename"]
    parts = urlsplit(ext.url)
    single = ext.is_nbd or ext.is_tar
    where = "the export itself" if single else f"{parts.scheme}://{parts.netloc}/"
    if ext.is_tar:
        where = "the tar"
    for name in info.files():
        if name != top and (single or not name.startswith(where)):
            raise ExternalDiskError(
                f"{ext.url} names {name!r} (a backing file or extent) outside {where}: "
                "QEMU would open it on this host. Serve the whole image from one place "
                "(for NBD, export the chain flattened: qemu-nbd -f qcow2), or flatten it "
                "with qemu-img convert"
            )


def probe(
    spec: DiskSpec,
    timeout: float,
    bridge: Callable[[str], AbstractContextManager[str]] | None = None,
    confine: Callable[[str], None] | None = None,
) -> Probed:
    """Check that the external disk can be read, and learn its format and size.
    QEMU's tools cannot read NBD over TLS or a tar member themselves: for those,
    `bridge(url)` yields a URL they can read. `confine(path)` refuses a local
    file outside the image roots (see check_files). Raises ExternalDiskError
    with a one-line reason."""
    ext = parse_url(spec.url)
    read_only: bool | None = None
    if ext.is_local and (problem := local_image_problem(ext.url)):
        raise ExternalDiskError(problem)
    if ext.is_nbd:
        try:
            export = nbd_client.probe(ext.url, timeout)
        except nbd_client.NBDProbeError as e:
            raise ExternalDiskError(f"cannot read {ext.url}: {e}") from e
        read_only = export.read_only
        if spec.check_readonly and not read_only:
            raise ExternalDiskError(
                f"{ext.url} is writable: another client could change it under the "
                "temporary disk; export it read-only (qemu-nbd --read-only), or pass "
                "check-readonly=off if nothing else writes to it"
            )
    opened = ext.url
    try:
        if ext.is_tls or ext.is_tar:
            if bridge is None:
                raise ExternalDiskError(f"{ext.url}: needs a bridge to be read")
            with bridge(ext.url) as opened:
                info = qemu_img.info(opened, spec.format, timeout, backing_chain=True)
        else:
            info = qemu_img.info(ext.url, spec.format, timeout, backing_chain=True)
    except CommandFailed as e:
        if e.returncode is None:
            raise ExternalDiskError(f"{ext.url} did not answer in {timeout:g} s") from e
        reason = _qemu_img_reason(e.stderr, opened)
        raise ExternalDiskError(f"cannot read {ext.url}: {reason}") from e
    if info.virtual_size <= 0:
        raise ExternalDiskError(f"{ext.url} is empty")
    check_files(ext, info, confine)
    return Probed(
        url=ext.url, format=info.format, virtual_size=info.virtual_size, read_only=read_only
    )
