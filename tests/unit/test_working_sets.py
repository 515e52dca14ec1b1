"""A boot working set is prefetched as runs: the blocks that touch merged, cut
at the largest read, in the order the first boot read them."""

from __future__ import annotations

from thinair.engine.working_sets import runs

MiB = 2**20


def test_blocks_that_touch_are_one_read_placed_where_first_read() -> None:
    wanted = [(9 * MiB, MiB), (2 * MiB, MiB), (10 * MiB, MiB), (3 * MiB, MiB), (40 * MiB, MiB)]
    assert runs(wanted) == [(9 * MiB, 2 * MiB), (2 * MiB, 2 * MiB), (40 * MiB, MiB)]


def test_overlapping_reads_merge_and_gaps_do_not() -> None:
    wanted = [(0, 8192), (4096, 8192), (16384, 4096)]
    assert runs(wanted) == [(0, 12288), (16384, 4096)]


def test_a_long_run_is_cut_at_the_largest_read() -> None:
    wanted = [(offset * MiB, MiB) for offset in range(70)]
    assert runs(wanted, most=32 * MiB) == [(0, 32 * MiB), (32 * MiB, 32 * MiB), (64 * MiB, 6 * MiB)]


def test_nothing_wanted_is_nothing_read() -> None:
    assert runs([]) == []
