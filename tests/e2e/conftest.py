"""End-to-end fixtures: the test guest image, a running engine on qemu:///system,
and helpers to watch a guest's console and read what it wrote."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import nbd
import pytest

from tests.conftest import ROOT, Engine
from tests.support import guest
from thinair.adapters import qemu_nbd
from thinair.client import Client


@pytest.fixture(scope="session")
def guest_image() -> Path:
    """The test guest (built once by the project's script, cached outside the tree)."""
    done = subprocess.run(
        [str(ROOT / "scripts" / "build-guest-image.sh")], check=True, capture_output=True, text=True
    )
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def engine(make_engine: Callable[..., Engine]) -> Engine:
    return make_engine("qemu:///system")


@pytest.fixture
def domains(engine: Engine, workdir: Path) -> tuple[Path, Path]:
    """Storage domains "tmp" and "final", added to the engine."""
    paths = workdir / "tmp", workdir / "final"
    for path in paths:
        path.mkdir(mode=0o755)
        engine.client().storage_domains.add(path.name, str(path))
    return paths


@pytest.fixture
def guest_export(guest_image: Path, nbd_export: Callable[..., qemu_nbd.Server]) -> qemu_nbd.Server:
    """The guest image exported read-only by qemu-nbd, as another host would."""
    return nbd_export(guest_image)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def wait_console(
    client: Client, vm: str, until: Callable[[guest.ConsoleInfo], bool], timeout: float = 180
) -> guest.ConsoleInfo:
    """Poll the VM's console through the API until `until(parsed)` holds."""
    deadline = time.monotonic() + timeout
    text = ""
    while True:
        text = client.vms.console(vm).text
        info = guest.parse_console(text)
        if info["errors"]:
            raise AssertionError(f"guest reported errors: {info['errors']}\n{text[-2000:]}")
        if until(info):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"guest console did not get there in {timeout} s:\n{text[-3000:]}")
        time.sleep(0.25)


@contextmanager
def image_reader(path: str, fmt: str = "qcow2") -> Iterator[Callable[[int, int], bytes]]:
    """read(offset, length) of what a guest sees in an image (its whole chain)."""
    server = qemu_nbd.Server(path, fmt=fmt, export_name="r", cache="writeback", aio="threads")
    server.start()
    handle = nbd.NBD()
    try:
        handle.connect_uri(server.url)

        def read(offset: int, length: int) -> bytes:
            step = 4 * 2**20  # NBD servers cap one request at 32 MiB
            return b"".join(
                handle.pread(min(step, offset + length - pos), pos)
                for pos in range(offset, offset + length, step)
            )

        yield read
        handle.shutdown()
    finally:
        server.stop()
