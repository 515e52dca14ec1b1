"""Probing external disks with real qemu-nbd, qemu-img and libnbd: the errors a
user gets must name the cause, and a good export is read correctly."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from thinair.adapters import qemu_img, qemu_nbd
from thinair.engine.probe import probe
from thinair.errors import ExternalDiskError
from thinair.external import DiskSpec

Export = Callable[..., qemu_nbd.Server]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_probe_nbd_export(nbd_export: Export, workdir: Path, fmt: str) -> None:
    image = workdir / f"img.{fmt}"
    qemu_img.create(str(image), fmt, 32 * 2**20)
    server = nbd_export(image, fmt="raw")  # serve the file's bytes, whatever they hold
    probed = probe(DiskSpec(url=server.url), timeout=10)
    assert probed.format == fmt  # the format inside the export is probed
    assert probed.read_only is True
    assert probed.virtual_size == 32 * 2**20


def test_probe_given_format_must_match(nbd_export: Export, raw_image: Path) -> None:
    server = nbd_export(raw_image)
    with pytest.raises(ExternalDiskError, match="not in qcow2 format"):
        probe(DiskSpec(url=server.url, format="qcow2"), timeout=10)


def test_probe_refused(nbd_export: Export) -> None:
    port = qemu_nbd.free_port()
    with pytest.raises(ExternalDiskError, match="Connection refused"):
        probe(DiskSpec(url=f"nbd://127.0.0.1:{port}/disk"), timeout=5)


def test_probe_unknown_export(nbd_export: Export, raw_image: Path) -> None:
    server = nbd_export(raw_image)
    with pytest.raises(ExternalDiskError, match="no export named 'nope'"):
        probe(DiskSpec(url=f"nbd://127.0.0.1:{server.port}/nope"), timeout=5)


def test_probe_writable_export_refused_unless_allowed(nbd_export: Export, raw_image: Path) -> None:
    server = nbd_export(raw_image, read_only=False)
    with pytest.raises(ExternalDiskError, match="is writable"):
        probe(DiskSpec(url=server.url), timeout=5)
    probed = probe(DiskSpec(url=server.url, check_readonly=False), timeout=5)
    assert probed.read_only is False


def test_probe_server_that_never_answers() -> None:
    # A listening socket that never speaks NBD: the probe must give up, not hang.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        began = time.monotonic()
        with pytest.raises(ExternalDiskError, match="no answer in 1 s"):
            probe(DiskSpec(url=f"nbd://127.0.0.1:{port}/disk"), timeout=1)
        assert time.monotonic() - began < 5


def test_probe_busy_single_client_server(nbd_export: Export, raw_image: Path) -> None:
    import nbd

    server = nbd_export(raw_image, shared=1)
    holder = nbd.NBD()
    holder.connect_uri(server.url)  # qemu-nbd --shared=1 now serves only this client
    with pytest.raises(ExternalDiskError, match="serves one client at a time"):
        probe(DiskSpec(url=server.url), timeout=1)
    holder.shutdown()


def test_probe_http_unreachable() -> None:
    port = qemu_nbd.free_port()
    with pytest.raises(ExternalDiskError, match="cannot read"):
        probe(DiskSpec(url=f"http://127.0.0.1:{port}/disk.img"), timeout=5)
