"""An NBD bridge with its cache, over a real nbdkit source that goes away and
comes back: it serves the source's bytes, what it read once without the source,
fails an uncached read once its retry window is over, and reads again once the
source is back; the outage watcher's check of a source says why it fails."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.support.far_source import FarSource, reads
from thinair.adapters import nbdkit
from thinair.config import Settings
from thinair.engine.context import EngineContext
from thinair.engine.outages import source_problem

MiB = 2**20


@pytest.fixture
def image(workdir: Path) -> Path:
    path = workdir / "source.raw"
    with open(path, "wb") as f:
        for i in range(16):
            f.write(bytes([i]) * MiB)
    path.chmod(0o644)
    return path


@pytest.fixture
def source(image: Path, workdir: Path) -> Iterator[FarSource]:
    far = FarSource(image, workdir / "source.pid", delay_ms=5, log_file=workdir / "source.log")
    far.start()
    yield far
    far.stop()


def test_cached_bridge_outlives_an_outage(source: FarSource, image: Path, workdir: Path) -> None:
    socket, pid_file = workdir / "bridge.sock", workdir / "bridge.pid"
    nbdkit.start(source.url, socket, pid_file, window=2, owner=None, cache=nbdkit.Cache())
    try:
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={socket}")
        assert h.pread(4096, 3 * MiB + 512) == bytes([3]) * 4096
        assert h.pread(MiB, 3 * MiB) == bytes([3]) * MiB  # a hit: the block came whole
        assert reads(workdir / "source.log")[-1:] == [(3 * MiB, MiB)]
        source.stop()
        assert h.pread(8192, 3 * MiB + 65536) == bytes([3]) * 8192  # cached: no source needed
        began = time.monotonic()
        with pytest.raises(nbd.Error):
            h.pread(4096, 9 * MiB)  # never read: fails once the window is over
        assert time.monotonic() - began >= 1.5
        FarSource(image, workdir / "source.pid", port=source.port).start()
        assert h.pread(4096, 9 * MiB) == bytes([9]) * 4096  # the bridge reconnected
        h.shutdown()
    finally:
        nbdkit.stop(socket, pid_file)


def test_source_problem_says_why(source: FarSource, image: Path, workdir: Path) -> None:
    ctx = EngineContext(Settings(home=workdir / "home", libvirt_uri="test:///default"))
    try:
        assert source_problem(ctx, source.url, "raw", timeout=5) is None
        source.stop()
        problem = source_problem(ctx, source.url, "raw", timeout=5)
        assert problem is not None and "refused" in problem.lower()
        FarSource(image, workdir / "source.pid", port=source.port).start()
        assert source_problem(ctx, source.url, "raw", timeout=5) is None
    finally:
        ctx.close()
