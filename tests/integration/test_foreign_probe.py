"""Probing foreign images and chains over HTTP and NBD with the real tools: a
chain resolves against its URL, and a remote image that names a file outside
its server (a backing file, a VMDK extent) is refused before QEMU opens it."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.foreign import http_server
from thinair.adapters import qemu_img, qemu_nbd
from thinair.engine.probe import probe
from thinair.errors import ExternalDiskError
from thinair.external import DiskSpec

MIB = 2**20


@pytest.fixture
def www(workdir: Path) -> Path:
    path = workdir / "www"
    path.mkdir(mode=0o755)
    return path


@pytest.fixture
def http(www: Path, workdir: Path) -> Iterator[str]:
    with http_server(www, workdir) as url:
        yield url


def _img(*argv: str, cwd: Path) -> None:
    subprocess.run([qemu_img.binary(), *argv], check=True, capture_output=True, cwd=cwd)
    for path in cwd.iterdir():
        path.chmod(0o644)


def test_chain_over_http_resolves_against_the_url(www: Path, http: str) -> None:
    _img("create", "-f", "qcow2", "base.qcow2", "32M", cwd=www)
    _img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", cwd=www)
    probed = probe(DiskSpec(url=http + "top.qcow2"), timeout=10)
    assert (probed.format, probed.virtual_size) == ("qcow2", 32 * MIB)

    (www / "base.qcow2").unlink()
    with pytest.raises(ExternalDiskError, match="base.qcow2"):
        probe(DiskSpec(url=http + "top.qcow2"), timeout=10)


@pytest.mark.parametrize("fmt", ["vmdk", "vhdx", "vdi"])
def test_foreign_formats_probed_and_given(www: Path, http: str, fmt: str) -> None:
    _img("create", "-f", fmt, f"disk.{fmt}", "32M", cwd=www)
    assert probe(DiskSpec(url=f"{http}disk.{fmt}"), timeout=10).format == fmt
    assert probe(DiskSpec(url=f"{http}disk.{fmt}", format=fmt), timeout=10).format == fmt
    with pytest.raises(ExternalDiskError, match="cannot read"):
        probe(DiskSpec(url=f"{http}disk.{fmt}", format="qcow2"), timeout=10)


def test_backing_file_outside_the_server_refused(www: Path, http: str, workdir: Path) -> None:
    secret = workdir / "local.raw"
    secret.write_bytes(bytes(MIB))
    _img("create", "-f", "qcow2", "-u", "-b", str(secret), "-F", "raw", "evil.qcow2", "1M", cwd=www)
    with pytest.raises(ExternalDiskError, match=f"names '{secret}'.*outside http://"):
        probe(DiskSpec(url=http + "evil.qcow2"), timeout=10)


def test_vmdk_extent_outside_the_server_refused(www: Path, http: str, workdir: Path) -> None:
    secret = workdir / "local-flat.raw"
    secret.write_bytes(bytes(MIB))
    (www / "evil.vmdk").write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        f'createType="monolithicFlat"\n\nRW 2048 FLAT "{secret}" 0\n'
    )
    (www / "evil.vmdk").chmod(0o644)
    with pytest.raises(ExternalDiskError, match=f"names '{secret}'"):
        probe(DiskSpec(url=http + "evil.vmdk"), timeout=10)


def test_chain_over_nbd_refused(workdir: Path, nbd_export: Callable[..., qemu_nbd.Server]) -> None:
    """An NBD export serves one image: a qcow2 inside it whose backing file is
    named cannot be read right (that name would resolve on this host)."""
    _img("create", "-f", "qcow2", "base.qcow2", "32M", cwd=workdir)
    _img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", cwd=workdir)
    server = nbd_export(workdir / "top.qcow2", fmt="raw")
    with pytest.raises(ExternalDiskError, match="base.qcow2"):
        probe(DiskSpec(url=server.url), timeout=10)
    # Served flattened (qemu-nbd reads the chain), it is one raw image.
    flat = nbd_export(workdir / "top.qcow2", fmt="qcow2")
    assert probe(DiskSpec(url=flat.url), timeout=10).format == "raw"
