"""How a stream's window is cut into reads (readahead.Follower._pieces): whole
cache blocks, PIECE at most, none holding a whole aligned 2 MiB range (the
cache's one write of it would take a 2 MiB page of the page cache)."""

from __future__ import annotations

from pathlib import Path

import pytest

from thinair.engine import readahead

MiB = 2**20
KiB = 2**10


def _follower(tmp_path: Path, block: int) -> readahead.Follower:
    return readahead.Follower(tmp_path / "b.sock", tmp_path / "b.reads", 64 * MiB, block=block)


@pytest.mark.parametrize("block", [256 * KiB, 512 * KiB, MiB])
@pytest.mark.parametrize(
    "first,stop", [(0, 16 * MiB), (MiB, 9 * MiB), (3 * MiB, 4 * MiB), (5 * MiB, 12 * MiB)]
)
def test_pieces_hold_no_aligned_2_mib(tmp_path: Path, block: int, first: int, stop: int) -> None:
    pieces = _follower(tmp_path, block)._pieces(first, stop)
    assert pieces[0][0] == first and sum(n for _, n in pieces) == stop - first
    assert all(a + n == b for (a, n), (b, _) in zip(pieces, pieces[1:], strict=False))
    for offset, count in pieces:
        assert 0 < count <= readahead.PIECE and offset % block == 0 and count % block == 0
        aligned = -(-offset // readahead.HUGE) * readahead.HUGE
        assert aligned + readahead.HUGE > offset + count, (offset, count)
    # Not cut finer than it must: 2 MiB reads between odd MiB offsets.
    inner = [n for o, n in pieces if o % (2 * MiB) == MiB and o + 2 * MiB <= stop]
    assert all(n == 2 * MiB for n in inner) and (stop - first < 3 * MiB or inner)


@pytest.mark.parametrize("block", [2 * MiB, 4 * MiB])
def test_blocks_of_2_mib_or_more_are_read_one_at_a_time(tmp_path: Path, block: int) -> None:
    """Every write of such a block covers an aligned 2 MiB: nothing to avoid."""
    pieces = _follower(tmp_path, block)._pieces(0, 8 * block)
    assert pieces == [(i * block, block) for i in range(8)]
