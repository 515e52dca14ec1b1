"""Exports beyond loopback: NBD there gets TLS (PSK) unless plain is asked for
with --tls none, and then the CLI, the API's answer and `thinair exports`
say that anyone on the network can read the disk. Real qemu-nbd, real clients."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Engine
from tests.support.exports import pattern_image, stop_servers
from thinair import models

WARNING = "anyone on the network who can reach this port can read the whole disk"


@pytest.fixture(autouse=True)
def no_servers_left(workdir: Path) -> Iterator[None]:
    yield
    stop_servers(f"{workdir}/")


@pytest.fixture
def image(workdir: Path) -> Path:
    path = workdir / "pattern.raw"
    pattern_image(path)
    return path


def nbdinfo(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nbdinfo", "--size", url], capture_output=True, text=True, timeout=30, check=False
    )


def test_tls_by_default_off_loopback(test_engine: Engine, image: Path) -> None:
    done = test_engine.cli("expose", str(image), "--listen", "0.0.0.0", "--json")
    assert done.returncode == 0, done.stderr
    export = models.Export.model_validate_json(done.stdout)
    assert export.tls == "psk" and export.psk_file and export.warning is None
    assert "warning" not in done.stderr
    assert nbdinfo(export.url.replace("0.0.0.0", "127.0.0.1")).returncode == 0
    # A client without the key gets nothing.
    plain = f"nbd://127.0.0.1:{export.port}/{export.name}"
    assert nbdinfo(plain).returncode != 0


def test_plain_off_loopback_only_when_asked_and_said(test_engine: Engine, image: Path) -> None:
    done = test_engine.cli("expose", str(image), "--listen", "0.0.0.0", "--tls", "none")
    assert done.returncode == 0, done.stderr
    assert "warning:" in done.stderr and WARNING in " ".join(done.stderr.split()), done.stderr
    export = test_engine.client().exports.list()[0]
    assert export.tls == "none" and export.warning and WARNING in export.warning
    assert f"0.0.0.0:{export.port}" in export.warning
    assert nbdinfo(f"nbd://127.0.0.1:{export.port}/{export.name}").returncode == 0
    listing = test_engine.cli("exports")
    assert WARNING in " ".join(listing.stdout.split()) + " ".join(listing.stderr.split())


def test_loopback_stays_plain_and_quiet(test_engine: Engine, image: Path) -> None:
    c = test_engine.client()
    export = c.exports.create(str(image))
    assert export.tls == "none" and export.host == "127.0.0.1" and export.warning is None
    http = c.exports.create(str(image), protocol="http", listen="0.0.0.0", name="web")
    assert http.tls == "none" and http.warning and "plain HTTP" in http.warning
