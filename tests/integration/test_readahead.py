"""The engine's readahead (thinair.engine.readahead) against a real cached
bridge over a source 10 ms away: a guest reading one block after another gets
the source's bytes, and most of its reads are served by what was fetched
ahead, in few large requests; random reads, and any read from a near source,
fetch nothing ahead; a bridge started again is followed again; its reads are
told from the guest's."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.support.far_source import FarSource, blocks_sent, reads
from thinair.adapters import nbdkit
from thinair.config import Settings
from thinair.engine import readahead

MiB = 2**20
SIZE = 96 * MiB
# The most one read ahead fetches, as the engine's followers have it (the
# prefetch's pieces were once sized up to it, past what nbdkit takes).
MOST = Settings().bridge_readahead_max_mib * MiB


@pytest.fixture
def image(workdir: Path) -> Path:
    path = workdir / "source.raw"
    with open(path, "wb") as f:
        f.write(os.urandom(SIZE))
    path.chmod(0o644)
    return path


@pytest.fixture
def source(image: Path, workdir: Path) -> Iterator[FarSource]:
    far = FarSource(image, workdir / "source.pid", delay_ms=10, log_file=workdir / "source.log")
    far.start()
    yield far
    far.stop()


class Bridge:
    def __init__(self, source: FarSource, workdir: Path) -> None:
        self.socket, self.pid_file = workdir / "b.sock", workdir / "b.pid"
        self.log = workdir / "b.reads"
        self.source = source

    def start(self) -> None:
        cache = nbdkit.Cache(reads_log=self.log)
        nbdkit.start(self.source.url, self.socket, self.pid_file, 5, None, cache)

    def guest(self) -> nbd.NBD:
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={self.socket}")
        return h

    def stop(self) -> None:
        nbdkit.stop(self.socket, self.pid_file)
        self.log.unlink(missing_ok=True)


@pytest.fixture
def bridge(source: FarSource, workdir: Path) -> Iterator[Bridge]:
    b = Bridge(source, workdir)
    b.start()
    yield b
    b.stop()


def _sequential(h: nbd.NBD, image: Path, start: int, count: int) -> None:
    with open(image, "rb") as f:
        f.seek(start)
        for i in range(count):
            assert h.pread(MiB, start + i * MiB) == f.read(MiB), f"block {start // MiB + i}"


def test_sequential_reads_are_fetched_ahead(bridge: Bridge, image: Path, workdir: Path) -> None:
    follower = readahead.Follower(bridge.socket, bridge.log, 64 * MiB).start()
    try:
        guest = bridge.guest()
        _sequential(guest, image, 0, 64)
        guest.shutdown()
    finally:
        follower.stop()
    seen = reads(workdir / "source.log")
    assert sum(n for _, n in seen) <= SIZE  # nothing past the end
    tail = nbdkit.LogTail(bridge.log)
    logged = [r for r in tail.new() if r.answered is None]
    own = [r for r in logged if r.connection in tail.own]
    theirs = [r for r in logged if r.connection not in tail.own]
    # The guest's own misses were few: 4-6 here (the two that start a probe,
    # the block after them, the windows' markers), 64 without a follower.
    assert len(theirs) <= 16, [(r.offset // MiB, r.count // MiB) for r in theirs]
    assert follower.fetched >= 48 * MiB, follower.fetched
    assert follower.windows >= 2  # the guest's miss of the marker made it go on
    # The stream's reads: whole blocks, a piece at most, none twice (the guest
    # may ask for a block still on its way: then it is fetched twice).
    assert all(r.offset % MiB == 0 and 0 < r.count <= readahead.PIECE for r in own), own
    blocks = [r.offset // MiB + i for r in own for i in range(r.count // MiB)]
    assert len(blocks) == len(set(blocks))
    assert sum(r.count for r in own) == follower.fetched
    # None holds a whole aligned 2 MiB range (the cache's one write of it would
    # take a 2 MiB page of the page cache, see readahead.PIECE).
    huge = readahead.HUGE
    assert all(-(-r.offset // huge) * huge + huge > r.offset + r.count for r in own), own


def test_two_misses_in_a_row_probe_past_the_guests_next_block(
    bridge: Bridge, image: Path, workdir: Path
) -> None:
    """After two misses in a row the follower reads a few blocks one past the
    guest's next one: the guest's third block is its own miss (it asks before
    a read of it would come back), the blocks after it are hits; a run that
    goes on then gets its first window after the probe."""
    follower = readahead.Follower(bridge.socket, bridge.log, MOST).start()
    try:
        guest = bridge.guest()
        _sequential(guest, image, 40 * MiB, 1)  # two misses tell the source is far
        _sequential(guest, image, 60 * MiB, 1)
        _sequential(guest, image, 8 * MiB, 3)  # blocks 8, 9 (the probe's), 10
        deadline = time.monotonic() + 5
        while follower.windows == 0:  # the third miss made the run
            assert time.monotonic() < deadline, (follower.probes, follower.fetched)
            time.sleep(readahead.POLL)
        time.sleep(0.5)  # the probe's reads, queued first, are answered
        _sequential(guest, image, 11 * MiB, 2)
        guest.shutdown()
    finally:
        follower.stop()
    assert follower.probes == 1
    tail = nbdkit.LogTail(bridge.log)
    logged = [r for r in tail.new() if r.answered is None]
    theirs = [r.offset // MiB for r in logged if r.connection not in tail.own]
    own = [(r.offset // MiB, r.count // MiB) for r in logged if r.connection in tail.own]
    assert theirs == [40, 60, 8, 9, 10], theirs
    fetched = sorted(b for o, n in own for b in range(o, o + n))
    assert fetched[:2] == [11, 12], own  # the probe: one block past the guest's next


def test_nothing_is_streamed_while_the_disk_is_imported(
    bridge: Bridge, image: Path, workdir: Path
) -> None:
    """An import copies the source (a mirror reads it through the bridge, one
    block after another): the follower streams nothing meanwhile."""
    follower = readahead.Follower(bridge.socket, bridge.log, MOST, importing=lambda: True)
    follower.start()
    try:
        guest = bridge.guest()
        _sequential(guest, image, 0, 16)
        guest.shutdown()
        time.sleep(3 * readahead.POLL)
    finally:
        follower.stop()
    assert follower.far  # it would have streamed
    assert follower.fetched == 0 and follower.windows == 0
    assert reads(workdir / "source.log") == [(i * MiB, MiB) for i in range(16)]


def test_without_it_each_block_is_a_round_trip(bridge: Bridge, image: Path, workdir: Path) -> None:
    """The case above's reference: the same reads, no follower."""
    guest = bridge.guest()
    _sequential(guest, image, 0, 16)
    guest.shutdown()
    assert reads(workdir / "source.log") == [(i * MiB, MiB) for i in range(16)]


def _followed(source: FarSource, image: Path, workdir: Path, count: int) -> readahead.Follower:
    """A bridge of its own to `source`, followed while a guest reads its first
    `count` blocks one after another; the follower, stopped."""
    bridge = Bridge(source, workdir)
    bridge.start()
    follower = readahead.Follower(bridge.socket, bridge.log, 32 * MiB).start()
    try:
        guest = bridge.guest()
        _sequential(guest, image, 0, count)
        guest.shutdown()
    finally:
        follower.stop()
        bridge.stop()
    return follower


def test_holes_are_not_read_ahead(workdir: Path) -> None:
    """Zeros (holes in the source's allocation map) would cross the link for
    nothing: a window ends where the data does."""
    image = workdir / "sparse.raw"
    with open(image, "wb") as f:
        f.write(os.urandom(16 * MiB))
        f.truncate(SIZE)
    image.chmod(0o644)
    log_file = workdir / "sparse.log"
    with FarSource(image, workdir / "sparse.pid", delay_ms=10, log_file=log_file) as far:
        follower = _followed(far, image, workdir, 24)
    assert follower.fetched > 0
    beyond = [(o, n) for o, n in reads(log_file) if o + n > 16 * MiB]
    assert all(n == MiB for _, n in beyond), beyond  # only the guest's own misses


def test_a_near_source_gets_no_readahead(image: Path, workdir: Path) -> None:
    with FarSource(image, workdir / "near.pid", log_file=workdir / "source.log") as near:
        follower = _followed(near, image, workdir, 16)
    assert follower.fetched == 0
    assert not follower.far


def test_random_reads_fetch_at_most_a_probe_ahead(
    bridge: Bridge, image: Path, workdir: Path
) -> None:
    """Random reads, two neighbours now and then (as among many random reads
    over a small disk), but never three in a row: a lone read fetches nothing
    ahead, a pair a probe (a few blocks), never a window."""
    starts = list(range(0, SIZE // MiB, 3))
    random.Random(4).shuffle(starts)
    blocks = starts[:8] + [b + i for b in starts[8:20] for i in (0, 1)]  # 8 alone, 12 pairs
    follower = readahead.Follower(bridge.socket, bridge.log, 32 * MiB).start()
    try:
        guest = bridge.guest()
        with open(image, "rb") as f:
            for n, b in enumerate(blocks):
                f.seek(b * MiB + 4096)
                assert guest.pread(4096, b * MiB + 4096) == f.read(4096)
                if n == 7:  # the lone reads
                    time.sleep(3 * readahead.POLL)
                    assert follower.fetched == 0 and follower.probes == 0
        guest.shutdown()
        time.sleep(3 * readahead.POLL)
    finally:
        follower.stop()
    assert follower.windows == 0
    assert 0 < follower.probes <= 12
    assert follower.fetched <= follower.probes * readahead.PROBE_MOST
    sent = [o // MiB + i for o, n in reads(workdir / "source.log") for i in range(n // MiB)]
    assert len(sent) == len(set(sent))  # nothing fetched twice
    assert len(sent) * MiB <= 32 * MiB + follower.fetched


def test_the_engine_follows_the_bridges_that_run(
    bridge: Bridge, image: Path, workdir: Path
) -> None:
    """Readahead.find: a follower per bridge found under the bridges'
    directory, with the engine's settings; a bridge gone ends its follower, and
    the same bridge started again (an empty cache, a new log) gets a new one."""

    class Ctx:  # what Readahead reads of the engine's context
        class settings:  # noqa: N801
            home = workdir
            bridge_readahead_max_mib = 16
            bridge_readahead = True
            bridge_prefetch = False
            bridge_cache_max_mib = 2048
            bridge_cache_block_kib = 1024

    (workdir / "bridges").mkdir()
    bridge.stop()
    bridge.socket = workdir / "bridges" / "d1.sock"
    bridge.pid_file, bridge.log = (
        bridge.socket.with_suffix(".pid"),
        bridge.socket.with_suffix(".reads"),
    )
    bridge.start()
    engine = readahead.Readahead(Ctx())  # type: ignore[arg-type]
    try:
        engine.find()
        assert list(engine.followers) == [bridge.socket]
        first = engine.followers[bridge.socket]
        assert first.most == 16 * MiB
        guest = bridge.guest()
        _sequential(guest, image, 0, 24)
        guest.shutdown()
        _wait_fetched(first)
        assert max(n for _, n in reads(workdir / "source.log")) <= 16 * MiB
        began = time.monotonic()
        bridge.stop()  # the follower holds no connection open that nbdkit would wait for
        assert time.monotonic() - began < 3
        first.thread.join(2)
        assert not first.alive()
        engine.find()
        assert engine.followers == {}
        bridge.start()
        engine.find()
        again = engine.followers[bridge.socket]
        assert again is not first
        guest = bridge.guest()
        _sequential(guest, image, 0, 16)  # fetched again: the cache is new
        guest.shutdown()
        _wait_fetched(again)
    finally:
        engine.stop()


def _wait_fetched(follower: readahead.Follower, timeout: float = 5) -> None:
    """Until the follower has read ahead: its read may still be out when the
    guest's last read is answered (the guest read those blocks itself)."""
    deadline = time.monotonic() + timeout
    while not follower.fetched:
        assert time.monotonic() < deadline, "nothing read ahead"
        time.sleep(0.01)


def _wait_prefetched(follower: readahead.Follower, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not follower.prefetch_done:
        assert time.monotonic() < deadline, f"prefetched {follower.prefetched} bytes only"
        time.sleep(0.05)


@pytest.mark.parametrize("first", [(40, 7), (0,)], ids=["two-misses", "firmware"])
def test_a_quiet_guest_gets_the_whole_source_prefetched(
    bridge: Bridge, image: Path, workdir: Path, first: tuple[int, ...]
) -> None:
    """Once the guest is quiet, the rest of the source's data comes into the
    cache, each block once; then the guest's reads anywhere are hits. The
    follower learns that the source is far from the guest's two misses, or,
    from a guest that read only its first block (firmware finding nothing to
    boot), from the prefetch's own first miss (its first read is a hit)."""
    prefetch = readahead.Prefetch()
    follower = readahead.Follower(bridge.socket, bridge.log, MOST, prefetch).start()
    try:
        guest = bridge.guest()
        with open(image, "rb") as f:
            for b in first:
                f.seek(b * MiB)
                assert guest.pread(4096, b * MiB) == f.read(4096)
            _wait_prefetched(follower)
            before = len(reads(workdir / "source.log"))
            for b in random.Random(5).sample(range(SIZE // MiB), 16):
                f.seek(b * MiB + 512)
                assert guest.pread(8192, b * MiB + 512) == f.read(8192)
        guest.shutdown()
    finally:
        follower.stop()
    seen = reads(workdir / "source.log")
    assert len(seen) == before  # all hits
    blocks = blocks_sent(seen)
    assert sorted(blocks) == list(range(SIZE // MiB))  # all of it, each block once
    assert follower.prefetched >= SIZE - 2 * MiB
    assert max(n for _, n in seen) > MiB  # in pieces bigger than a block


def test_the_prefetch_waits_for_the_guest_and_for_an_import(
    bridge: Bridge, image: Path, workdir: Path
) -> None:
    """Nothing is prefetched while the guest keeps reading from the source, nor
    while an import copies it (`importing`); it starts once both are over."""
    importing = [True]
    follower = readahead.Follower(
        bridge.socket, bridge.log, MOST, readahead.Prefetch(), importing=lambda: importing[0]
    ).start()
    try:
        guest = bridge.guest()
        rng = random.Random(6)
        blocks = rng.sample(range(SIZE // MiB), 20)
        for b in blocks[:10]:  # a miss every 0.2 s: never QUIET
            guest.pread(4096, b * MiB)
            time.sleep(0.2)
        assert follower.prefetched == 0
        importing[0] = False
        for b in blocks[10:]:
            guest.pread(4096, b * MiB)
            time.sleep(0.2)
        assert follower.prefetched == 0
        importing[0] = True
        time.sleep(2 * readahead.QUIET)
        assert follower.prefetched == 0  # quiet, but an import copies the source
        importing[0] = False
        _wait_prefetched(follower)
        guest.shutdown()
    finally:
        follower.stop()
    assert sorted(blocks_sent(reads(workdir / "source.log"))) == list(range(SIZE // MiB))


def test_the_prefetch_leaves_the_cache_room_and_reads_no_holes(workdir: Path) -> None:
    """A prefetch stops before the cache would drop what it holds (`budget`),
    and never reads what the allocation map says reads as zeros."""
    image = workdir / "sparse.raw"
    with open(image, "wb") as f:
        for at in (0, 40 * MiB, 80 * MiB):  # three runs of 8 MiB of data
            f.seek(at)
            f.write(os.urandom(8 * MiB))
        f.truncate(SIZE)
    image.chmod(0o644)
    log_file = workdir / "sparse.log"
    with FarSource(image, workdir / "sparse.pid", delay_ms=10, log_file=log_file) as far:
        bridge = Bridge(far, workdir)
        bridge.start()
        try:
            whole = readahead.Follower(bridge.socket, bridge.log, MOST, readahead.Prefetch())
            whole.start()
            try:
                guest = bridge.guest()
                guest.pread(4096, 41 * MiB)
                guest.pread(4096, 60 * MiB)  # a hole: zeros, read by the guest only
                _wait_prefetched(whole)
                guest.shutdown()
            finally:
                whole.stop()
            data = {b for at in (0, 40, 80) for b in range(at, at + 8)}
            assert set(blocks_sent(reads(log_file))) == data | {60}
        finally:
            bridge.stop()
        bridge.start()  # an empty cache
        try:
            log_file.write_text("")
            some = readahead.Prefetch(budget=12 * MiB)
            part = readahead.Follower(bridge.socket, bridge.log, MOST, some).start()
            try:
                guest = bridge.guest()
                guest.pread(4096, 85 * MiB)
                guest.pread(4096, 2 * MiB)
                _wait_prefetched(part)
                guest.shutdown()
            finally:
                part.stop()
            fetched = sum(n for _, n in reads(log_file))
            assert 8 * MiB <= fetched <= 12 * MiB
        finally:
            bridge.stop()


def test_the_engine_pauses_a_prefetch_while_the_disk_is_imported(workdir: Path) -> None:
    """Readahead.find gives each follower the engine's prefetch: paused while
    the disk has an import record (its copier reads the source), with 3/4 of
    the cache as its budget, the cache's block as its unit."""

    class Ctx:
        class settings:  # noqa: N801
            home = workdir
            bridge_readahead_max_mib = 32
            bridge_readahead = False
            bridge_prefetch = True
            bridge_cache_max_mib = 1024
            bridge_cache_block_kib = 256

    (workdir / "bridges").mkdir()
    (workdir / "bridges" / "d7.sock").touch()  # what find() looks for: a socket, a log
    (workdir / "bridges" / "d7.reads").touch()
    engine = readahead.Readahead(Ctx())  # type: ignore[arg-type]
    try:
        engine.find()
        follower = engine.followers[workdir / "bridges" / "d7.sock"]
        assert follower.prefetch is not None and not follower.ahead_on
        assert follower.prefetch.budget == 768 * MiB
        assert follower.block == 256 * 1024
        assert not follower.importing()
        (workdir / "imports" / "d7.json").write_text("{}")
        assert follower.importing()
    finally:
        (workdir / "bridges" / "d7.sock").unlink()
        engine.stop()


def test_a_near_source_gets_no_prefetch(image: Path, workdir: Path) -> None:
    """A source as near as the cache: the guest's misses say so, or, for a
    guest that read nothing yet, the prefetch's one first read does."""
    with FarSource(image, workdir / "near.pid", log_file=workdir / "source.log") as near:
        for guest_reads in (2, 0):
            bridge = Bridge(near, workdir)  # a new one: its log knows no misses
            bridge.start()
            try:
                follower = readahead.Follower(
                    bridge.socket, bridge.log, MOST, readahead.Prefetch()
                ).start()
                try:
                    guest = bridge.guest()
                    for b in range(guest_reads):
                        guest.pread(4096, (10 + 5 * b) * MiB)
                    time.sleep(4 * readahead.QUIET)
                    guest.shutdown()
                finally:
                    follower.stop()
            finally:
                bridge.stop()
            if guest_reads:
                assert follower.prefetched == 0, follower.took
            else:
                assert follower.prefetched == MiB  # its first read only, one block
            assert not follower.prefetch_done


def test_the_cache_keeps_no_more_once_it_fetched_its_limit(
    source: FarSource, image: Path, workdir: Path
) -> None:
    """The cow filter drops no block: past `limit` the follower removes the
    bridge's keep file, and what is read then crosses the link each time;
    what was kept before still does not."""
    socket, pid_file, log = workdir / "k.sock", workdir / "k.pid", workdir / "k.reads"
    keep = workdir / "k.keep"
    nbdkit.start(source.url, socket, pid_file, 5, None, nbdkit.Cache(reads_log=log, keep=keep))
    follower = readahead.Follower(
        socket, log, 32 * MiB, ahead=False, keep=keep, limit=4 * MiB
    ).start()
    try:
        assert keep.exists()
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={socket}")
        with open(image, "rb") as f:
            blocks = f.read(SIZE)
        for i in (0, 2, 4, 6):  # 4 MiB fetched: the limit
            assert h.pread(MiB, i * MiB) == blocks[i * MiB : (i + 1) * MiB]
        deadline = time.monotonic() + 5
        while keep.exists():
            assert time.monotonic() < deadline, "the keep file is still there"
            time.sleep(0.05)
        for i in (10, 10, 0):
            assert h.pread(MiB, i * MiB) == blocks[i * MiB : (i + 1) * MiB]
        h.shutdown()
    finally:
        follower.stop()
        nbdkit.stop(socket, pid_file)
    seen = [offset // MiB for offset, _ in reads(workdir / "source.log")]
    assert seen == [0, 2, 4, 6, 10, 10], seen
