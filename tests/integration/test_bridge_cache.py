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
from thinair.adapters import nbd_copy, nbdkit
from thinair.config import Settings
from thinair.engine import working_sets
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


def test_working_set_recorded_then_prefetched(
    source: FarSource, image: Path, workdir: Path
) -> None:
    """The second bridge fetches the first one's boot reads, the blocks that
    touch in one request to the source each, and its guest's reads are hits."""
    ctx = EngineContext(Settings(home=workdir / "home", libvirt_uri="test:///default"))
    first = (workdir / "first.sock", workdir / "first.pid", workdir / "first.reads")
    second = (workdir / "second.sock", workdir / "second.pid", workdir / "second.reads")
    try:
        nbdkit.start(source.url, *first[:2], 2, None, nbdkit.Cache(reads_log=first[2]))
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={first[0]}")
        for offset in (5 * MiB + 7, 2 * MiB, 5 * MiB + 4096, 11 * MiB, 6 * MiB + 1, 3 * MiB):
            h.pread(512, offset)
        h.shutdown()
        assert working_sets.record(ctx, source.url, first[2])
        assert working_sets.blocks(ctx, source.url) == [
            (5 * MiB, MiB),
            (2 * MiB, MiB),
            (11 * MiB, MiB),
            (6 * MiB, MiB),
            (3 * MiB, MiB),
        ]
        assert not working_sets.record(ctx, source.url, first[2])  # kept once
        before = len(reads(workdir / "source.log"))
        nbdkit.start(source.url, *second[:2], 2, None, nbdkit.Cache(reads_log=second[2]))
        thread = working_sets.prefetch(ctx, source.url, second[0])
        assert thread is not None
        thread.join(30)
        fetched = reads(workdir / "source.log")[before:]
        assert sorted(fetched) == [(2 * MiB, 2 * MiB), (5 * MiB, 2 * MiB), (11 * MiB, MiB)]
        tail = nbdkit.LogTail(second[2])
        logged = [r for r in tail.new() if r.answered is None]
        assert logged and all(r.connection in tail.own for r in logged)  # not the guest's
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={second[0]}")
        assert h.pread(4096, 11 * MiB + 8192) == bytes([11]) * 4096
        assert h.pread(4096, 3 * MiB) == bytes([3]) * 4096
        h.shutdown()
        assert len(reads(workdir / "source.log")) == before + 3  # the reads were hits
    finally:
        nbdkit.stop(*first[:2])
        nbdkit.stop(*second[:2])
        ctx.close()


def test_the_copier_holds_back_while_the_guest_reads_through_the_bridge(
    image: Path, workdir: Path
) -> None:
    """ReadsWatch sees a read the bridge sends its source (a miss) while it is
    unanswered, and not a hit; a copier told so issues nothing meanwhile."""
    far = FarSource(image, workdir / "slow.pid", delay_ms=1500, log_file=workdir / "slow.log")
    far.start()
    socket, pid_file, log_file = workdir / "b.sock", workdir / "b.pid", workdir / "b.reads"
    nbdkit.start(far.url, socket, pid_file, 5, None, nbdkit.Cache(reads_log=log_file))
    try:
        watch = nbdkit.ReadsWatch(log_file, hold=0.2)
        assert not watch.busy()
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={socket}")
        h.aio_pread(nbd.Buffer(4096), 5 * MiB)  # a miss: 1.5 s at the source
        time.sleep(0.5)
        assert watch.busy() and watch.reads == 1
        # A copier that starts now sends the source nothing until the read is in.
        before = len(reads(workdir / "slow.log"))
        assert before == 1
        began = time.monotonic()
        dest = workdir / "copy.raw"
        nbd_copy.copy(far.url, str(dest), str(workdir / "digests"), guest_busy=watch.busy)
        copied = reads(workdir / "slow.log")[before:]
        assert time.monotonic() - began >= 1.0 + 1.5  # held ~1 s, then reads of 1.5 s each
        # At the source: the copier's first read came after the guest's was answered.
        logged = (workdir / "slow.log").read_text().splitlines()
        guest = next(line for line in logged if "...Read" in line)
        copier = [line for line in logged if " Read id=" in line][1]
        assert guest.split(" connection=")[0] <= copier.split(" connection=")[0]
        assert dest.read_bytes() == image.read_bytes()
        while h.aio_in_flight():
            h.poll(1000)
        time.sleep(0.3)  # past the hold
        assert not watch.busy()
        assert h.pread(4096, 5 * MiB + 8192) == bytes([5]) * 4096  # a hit: not seen
        assert not watch.busy() and watch.reads == 1
        assert copied and min(o for o, _ in copied) == 0
        h.shutdown()
    finally:
        nbdkit.stop(socket, pid_file)
        far.stop()


def test_the_copier_reads_what_the_bridge_fetched_from_its_cache(
    source: FarSource, image: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing crosses the link twice: blocks the guest read through its bridge
    are copied from the bridge's cache, the rest from the source; the copy is
    the source's bytes. (Requests of 2 MiB, twice the cache's block: one the
    guest read half of comes from the source.)"""
    monkeypatch.setattr(nbd_copy, "REQUEST", 2 * MiB)
    socket, pid_file, log_file = workdir / "b.sock", workdir / "b.pid", workdir / "b.reads"
    nbdkit.start(source.url, socket, pid_file, 5, None, nbdkit.Cache(reads_log=log_file))
    try:
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={socket}")
        for block in (2, 3, 4, 5, 9):  # the guest's reads: 1 MiB blocks fetched whole
            assert h.pread(4096, block * MiB + 100) == bytes([block]) * 4096
        before = len(reads(workdir / "source.log"))
        watch = nbdkit.ReadsWatch(log_file)
        dest = workdir / "copy.raw"
        nbd_copy.copy(
            source.url,
            str(dest),
            str(workdir / "digests"),
            cached=(f"nbd+unix:///?socket={socket}", watch.covers),
        )
        assert dest.read_bytes() == image.read_bytes()
        copied = sorted(reads(workdir / "source.log")[before:])
        # 2 MiB requests: [2, 4) and [4, 6) came from the cache, the others
        # (9 is only half of [8, 10)) from the source.
        assert copied == [(o * MiB, 2 * MiB) for o in (0, 6, 8, 10, 12, 14)]
        h.shutdown()
    finally:
        nbdkit.stop(socket, pid_file)
