"""Asking an external disk's server what it holds, before anything is created."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from thinair.adapters import nbd_client, qemu_img
from thinair.adapters._process import CommandFailed
from thinair.errors import ExternalDiskError
from thinair.external import DiskSpec, parse_url


@dataclass(frozen=True)
class Probed:
    url: str
    format: str
    virtual_size: int
    read_only: bool | None  # None where the protocol cannot tell


def _qemu_img_reason(stderr: str) -> str:
    # qemu-img prefixes its messages with "qemu-img: Could not open '...': ";
    # keep the last, most specific part.
    line = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
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


def probe(
    spec: DiskSpec,
    timeout: float,
    tls_bridge: Callable[[str], AbstractContextManager[str]] | None = None,
) -> Probed:
    """Check that the external disk can be read, and learn its format and size.
    QEMU's tools cannot read NBD over TLS themselves: for that, `tls_bridge(url)`
    yields a URL they can read. Raises ExternalDiskError with a one-line reason."""
    ext = parse_url(spec.url)
    read_only: bool | None = None
    if ext.is_local and (problem := local_image_problem(ext.url)):
        raise ExternalDiskError(problem)
    if ext.is_nbd:
        try:
            export = nbd_client.probe(ext.url, timeout)
        except nbd_client.NBDProbeError as e:
            raise ExternalDiskError(f"cannot read {ext.url}: {e}") from None
        read_only = export.read_only
        if spec.check_readonly and not read_only:
            raise ExternalDiskError(
                f"{ext.url} is writable: another client could change it under the "
                "temporary disk; export it read-only (qemu-nbd --read-only), or pass "
                "check-readonly=off if nothing else writes to it"
            )
    try:
        if ext.is_tls:
            if tls_bridge is None:
                raise ExternalDiskError(f"{ext.url}: NBD over TLS needs a bridge")
            with tls_bridge(ext.url) as readable:
                info = qemu_img.info(readable, fmt=spec.format, timeout=timeout)
        else:
            info = qemu_img.info(ext.url, fmt=spec.format, timeout=timeout)
    except CommandFailed as e:
        if e.returncode is None:
            raise ExternalDiskError(f"{ext.url} did not answer in {timeout:g} s") from None
        raise ExternalDiskError(f"cannot read {ext.url}: {_qemu_img_reason(e.stderr)}") from None
    if info.virtual_size <= 0:
        raise ExternalDiskError(f"{ext.url} is empty")
    return Probed(
        url=ext.url, format=info.format, virtual_size=info.virtual_size, read_only=read_only
    )
