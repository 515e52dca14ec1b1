"""Readahead: a cached bridge fetches ahead of the guest's sequential reads.

Over distance, a guest reading a file one block after another pays one round
trip per block of its bridge's cache (1 MiB per 25 ms is 40 MiB/s), whatever
the link carries. nbdkit 1.32 has no readahead that helps: its readahead filter
prefetches with `.cache` calls, which the cache filter serves one block per
round trip, under the one lock it takes for every block. So the engine follows
each cached bridge's reads log (below the cache: misses only) and, where RUN
misses came one after another (a sequential run), reads the next window of
bytes through the bridge in one request, on a connection of its own: the cache
filter fetches them from the source in one request (its runs of missing blocks
go as one read) and keeps them, so the guest's next reads hit. Each window
is `most` bytes in whole cache blocks (a part of a block is a request of its
own to the source: a round trip more), kept to what the link carries in
WINDOW_SECONDS (the fastest of the follower's last reads; until it has one,
the guest's misses, which count the round trip in), because the fetch holds
the cache's lock and every guest read, hits included, waits behind it (on a
100 Mbit/s link a 32 MiB fetch would be 2.7 s of a stalled guest). That lock
bounds what a read ahead gives: the guest waits for each fetch, so a
sequential reader gets at most the bridge's fetch rate against its own local
one (here 32 MiB came through the bridge in about 180 ms, the source's part
of it 34 ms, and the guest read as much from the cache in about 170 ms: 64
MiB from 25 ms away came to 0.44-0.48x the speed with no delay, whether the
windows started at 8 MiB and doubled or were `most` from the first). It
reads only what the source's allocation map says is data (asked once per
bridge), never zeros. Random reads fetch nothing
ahead, and neither does a source as near as the cache (the guest's misses take
less than NEAR): there the guest's own reads are as quick, and a read ahead
only makes them wait.

Its connection opens the export READAHEAD_EXPORT, so the log tells its reads
from the guest's. An import's copier counts them as the guest's (they are done
for it) and reads what they fetched from the bridge's cache, not over the link
again. One follower thread per bridge, found by its files under
THINAIR_HOME/bridges: a bridge started again (its log starts over), an engine
started again, a VM gone (its bridge's socket gone) need nothing else. An
optimization only: a read ahead that fails costs the time it took.

With a `Prefetch`, a follower also fetches the rest of the source's data into
the cache, at the lowest priority: one read of what the link carries in
PREFETCH_SECONDS at a time (whole cache blocks), then as long again with the
link left idle (REST), from the start of the data to its end, only while the
guest's bridge has no read of its own out and had none for QUIET seconds, and
only from a far source (as the guest's misses say, or, before it had two, the
prefetch's own first miss, one block). A guest read that comes while a piece
is out waits for it (the cache's lock, and the link); REST halves how often
that happens (100 Mbit/s, a read every 0.5-1.5 s: a median read as with no
prefetch, against 2.4x without REST). Then the guest's later reads are
local, and an import of the disk reads them from the cache, not over the link
again. It stops where the cache would start to drop blocks (`budget`), and
while an import of the disk copies the source (`paused`: the copier reads
what the cache holds from it, the rest from the source).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nbd

from thinair.adapters import nbd_client, nbdkit
from thinair.adapters.nbd_address import NbdAddress
from thinair.adapters.nbd_copy import CopyError, data_extents
from thinair.engine import bridges, import_state
from thinair.engine.context import EngineContext

log = logging.getLogger(__name__)

MiB = 2**20
# Misses one after another that make a run: three blocks in a row. Two would
# also be found among random reads (one in 30 of them lands right after one of
# the last 16, here 1 MiB blocks of 512 MiB), and on a thin link a read ahead
# makes the guest's next read wait for it.
RUN = 3
ENDS = 16  # the guest's last misses remembered
WINDOW_SECONDS = 0.5
NEAR = 0.008  # seconds: a miss this quick is from a source as near as the cache
POLL = 0.005  # seconds between looks at a log that is being written to
IDLE_POLL = 0.05  # ... at one that has been quiet for IDLE seconds
IDLE = 2.0
FIND = 1.0  # seconds between looks for bridges started or gone
CONNECT_TIMEOUT = 5.0
# Seconds the connection stays open after a read ahead. Opening one takes the
# cache's lock (its handshake asks the size), behind the guest's reads; one
# left open for good would keep the bridge from exiting when it is stopped
# (nbdkit waits for its clients).
HOLD = 0.5
# The prefetch: each read is what the link carries in PREFETCH_SECONDS (it
# holds the cache's lock, so that is what a guest read that comes meanwhile
# waits at most), and it reads only once the guest has had no miss for QUIET.
PREFETCH_SECONDS = 0.1
QUIET = 0.5
REST = 1.0  # after each piece, the link is left idle for as long as it took


@dataclass(frozen=True)
class Prefetch:
    """The whole source fetched into the cache in the background (see the
    module's docstring)."""

    budget: int = 0  # bytes the cache may fetch in all before it drops blocks; 0: no limit
    paused: Callable[[], bool] = lambda: False  # an import of the disk copies it


class Follower:
    """Reads ahead of one bridge's guest (see the module's docstring)."""

    def __init__(
        self,
        socket: Path,
        reads_log: Path,
        most: int,
        prefetch: Prefetch | None = None,
        ahead: bool = True,
        block: int = MiB,
    ) -> None:
        self.socket = socket
        self.tail = nbdkit.LogTail(reads_log)
        self.block = block  # the cache's: what is read ahead is whole blocks
        self.most = max(most - most % block, block)
        self.stopping = threading.Event()
        # Where the guest's last misses ended, and how many misses in a row led there.
        self.ends: OrderedDict[int, int] = OrderedDict()
        self.behind, self.ahead = 0, 0  # the last read ahead: [behind, ahead)
        self.cap = self.most  # what the link carries in WINDOW_SECONDS
        self.took: deque[float] = deque(maxlen=4)  # the guest's last misses, seconds each
        self.own_took: deque[float] = deque(maxlen=4)  # ... and this follower's own
        self.own_rates: deque[float] = deque(maxlen=4)  # bytes/s of its own last misses
        self.sent: dict[tuple[bytes, bytes], nbdkit.Logged] = {}  # own misses unanswered
        self.fetched = 0  # bytes read ahead, for the log and tests
        self.windows = 0  # reads ahead, for tests
        self.handle: nbd.NBD | None = None  # open while a run goes on (see HOLD)
        self.data: list[tuple[int, int]] | None = None  # the source's data: [start, end)
        self.ahead_on = ahead  # read ahead of sequential runs
        self.prefetch = prefetch
        self.cursor = 0  # where the prefetch goes on from
        self.prefetched = 0  # bytes the prefetch asked for, for the log and tests
        self.prefetch_done = False
        self.prefetch_began = 0.0
        self.prefetch_next_at = 0.0  # not before (see REST)
        self.missed = 0  # bytes the cache fetched from the source since the bridge started
        # When the log last showed a read of the guest (monotonic): the start,
        # so that a guest starting up reads first.
        self.guest_at = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="readahead", daemon=True)

    def start(self) -> Follower:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def _run(self) -> None:
        quiet_since, seen, fetched_at = time.monotonic(), 0, 0.0
        try:
            while not self.stopping.is_set() and self.socket.exists():
                start = self.step()
                now = time.monotonic()
                if start is not None:
                    self._fetch(start)
                    fetched_at = time.monotonic()
                elif self._prefetch_due(now) and self._prefetch_next():
                    fetched_at = time.monotonic()
                elif now - fetched_at > HOLD:
                    self._disconnect()
                if start is not None or self.tail.offset != seen:
                    quiet_since, seen = now, self.tail.offset
                self.stopping.wait(POLL if now - quiet_since < IDLE else IDLE_POLL)
        finally:
            self._disconnect()
        if self.fetched:
            log.info("read ahead %d MiB for the guest of %s", self.fetched // MiB, self.socket)
        if self.prefetched and not self.prefetch_done:
            log.info("prefetched %d MiB for %s", self.prefetched // MiB, self.socket)

    def step(self) -> int | None:
        """Look at what the log says since the last look: where to read ahead
        from, if a sequential run goes on past what is cached."""
        found = self.tail.new()
        if self.tail.restarted:  # a bridge started again: an empty cache
            self.ends.clear()
            self.sent.clear()
            self.behind, self.ahead = 0, 0
            self.cursor, self.missed, self.prefetch_done = 0, 0, False
        start = None
        for read in found:
            self._measure(read)
            if read.answered is None:
                self.missed += read.count
            if read.connection not in self.tail.own:
                self.guest_at = time.monotonic()
            if read.connection in self.tail.own or read.answered is not None or not read.count:
                continue
            end = read.offset + read.count
            if self.ahead and self.behind <= read.offset <= self.ahead:
                # The guest read on to (or, first, into) what was fetched ahead.
                start = max(end, self.ahead)
                self.ends[end] = RUN
                continue
            run = self.ends.pop(read.offset, 0) + 1
            if run >= RUN and not self.behind < end <= self.ahead:  # a new run
                start = end
            self.ends[end] = run
            while len(self.ends) > ENDS:
                self.ends.popitem(last=False)
        return start if self.far and self.ahead_on else None

    @property
    def far(self) -> bool:
        """The guest's last misses all took NEAR or more (two at least: the
        first read from a near source may be slow, its file not yet in memory)."""
        return len(self.took) >= 2 and min(self.took) >= NEAR

    def _measure(self, read: nbdkit.Logged) -> None:
        """How far the source is and what the link carries, from the log's
        times of each miss (the time the source took, not the time a read
        waited for the cache's lock): the guest's tell whether the source is
        near (see `far`: then no read ahead pays), this follower's own what the
        link carries (the guest's small ones until then: they count the round
        trip in)."""
        key = (read.connection, read.id)
        if read.answered is None:
            self.sent[key] = read
            return
        began = self.sent.pop(key, None)
        if began is None or read.answered != 0 or read.at <= began.at or not began.count:
            return
        took = read.at - began.at
        own = read.connection in self.tail.own
        (self.own_took if own else self.took).append(took)
        if own:
            # The fastest of the last few: a one-block read is mostly round
            # trip, and taken alone it would shrink the next window to what
            # a round trip carries (40 MiB/s at 25 ms: 20 MiB windows).
            self.own_rates.append(began.count / took)
            self._cap(max(self.own_rates))
        elif not self.own_rates:
            self._cap(began.count / took)

    def _cap(self, rate: float) -> None:
        cap = int(rate * WINDOW_SECONDS)
        self.cap = max(self.block, min(self.most, cap - cap % self.block))

    def _connect(self) -> tuple[nbd.NBD, list[tuple[int, int]]]:
        """The follower's own connection to the bridge, and the source's data."""
        if self.handle is None:
            url = NbdAddress.unix(str(self.socket), export=nbdkit.READAHEAD_EXPORT).url()
            self.handle = nbd_client.connect(url, CONNECT_TIMEOUT, allocation_map=True)
        if self.data is None:
            size = self.handle.get_size()
            extents = data_extents(self.handle, 0, size)
            self.data = [(e.offset, e.offset + e.length) for e in extents]
        return self.handle, self.data

    def _fetch(self, start: int) -> None:
        """Read [start, start + most) through the bridge (less on a thin link),
        in whole blocks: a part of one is a request of its own to the source,
        and a round trip more."""
        try:
            handle, data = self._connect()
            # Only data: what reads as zeros would cross the link for nothing.
            i = bisect.bisect_right(data, (start, float("inf"))) - 1
            if i < 0 or start >= data[i][1]:
                return
            start = max(start - start % self.block, data[i][0])
            length = min(self.cap, data[i][1] - start)
            began = time.monotonic()
            handle.pread(length, start)
            took = time.monotonic() - began
        except (nbd.Error, nbd_client.NBDProbeError, CopyError) as e:
            log.debug("reading ahead at %d through %s: %s", start, self.socket, e)
            self._disconnect()  # connect again next time (a bridge started again)
            return
        self.behind, self.ahead = start, start + length
        self.fetched += length
        self.windows += 1
        log.debug("read ahead %d MiB at %d MiB in %.3f s", length // MiB, start // MiB, took)

    def _prefetch_due(self, now: float) -> bool:
        """Whether the prefetch may read now: the guest has nothing out and
        was quiet for QUIET, the source is far, no import copies it. Far: as
        the guest's misses say, or, before it had two (a guest that reads
        little: firmware finding nothing to boot), as the prefetch's own first
        miss says."""
        if self.prefetch is None or self.prefetch_done or self._far_for_prefetch() is False:
            return False
        if now - self.guest_at < QUIET or now < self.prefetch_next_at:
            return False
        if any(connection not in self.tail.own for connection, _ in self.sent):
            return False  # a miss of the guest is out (a slow one)
        return not self.prefetch.paused()

    def _far_for_prefetch(self) -> bool | None:
        """Whether the source is far, for the prefetch: as the guest's misses
        say (two at least), else as the prefetch's own misses do; None while
        neither says (the prefetch reads one block at a time until one does)."""
        if len(self.took) >= 2:
            return self.far
        if self.own_took:
            return min(self.own_took) >= NEAR
        return None

    def _prefetch_next(self) -> bool:
        """Read the next piece of the source's data through the bridge; False
        if nothing was read."""
        assert self.prefetch is not None
        try:
            handle, data = self._connect()
            i = bisect.bisect_right(data, (self.cursor, float("inf"))) - 1
            if i < 0 or self.cursor >= data[i][1]:
                i += 1  # in a hole, or past an extent's end: the next extent
                if i == len(data):
                    self._prefetched("the whole source's data")
                    return False
                self.cursor = data[i][0]
            # Whole cache blocks (the cache fetches whole blocks anyway), one
            # until a read was a miss (not one the guest had fetched): its time
            # tells whether the source is far.
            block = self.block
            blocks = max(1, int(self.cap * PREFETCH_SECONDS / WINDOW_SECONDS) // block)
            if self._far_for_prefetch() is None:
                blocks = 1
            end = min(self.cursor - self.cursor % block + blocks * block, data[i][1])
            length = end - self.cursor
            budget = self.prefetch.budget
            if budget and self.missed + length > budget:
                self._prefetched("as much as the cache holds")
                return False
            began = time.monotonic()
            if not self.prefetched:
                self.prefetch_began = began
            handle.pread(length, self.cursor)
            ended = time.monotonic()
            took = ended - began
            self.prefetch_next_at = ended + took * REST
            log.debug("prefetched %d KiB at %d in %.3f s", length // 1024, self.cursor, took)
        except (nbd.Error, nbd_client.NBDProbeError, CopyError) as e:
            log.debug("prefetching at %d through %s: %s", self.cursor, self.socket, e)
            self._disconnect()
            self.prefetch_next_at = time.monotonic() + CONNECT_TIMEOUT  # a source gone, say
            return False
        self.cursor += length
        self.prefetched += length
        return True

    def _prefetched(self, what: str) -> None:
        self.prefetch_done = True
        log.info(
            "prefetched %s for %s: %d MiB in %.1f s",
            what,
            self.socket,
            self.prefetched // MiB,
            time.monotonic() - self.prefetch_began if self.prefetched else 0.0,
        )

    def _disconnect(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(nbd.Error):
                self.handle.shutdown()
            self.handle = None


class Readahead:
    """A thread of the engine: a Follower for every cached bridge that runs."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.most = ctx.settings.bridge_readahead_max_mib * MiB
        self.block = ctx.settings.bridge_cache_block_kib * 1024
        self.ahead = ctx.settings.bridge_readahead
        # Three quarters of the cache: what the guest read stays in it.
        self.budget = ctx.settings.bridge_cache_max_mib * MiB * 3 // 4
        self.prefetch = ctx.settings.bridge_prefetch
        self.followers: dict[Path, Follower] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="readahead-find", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        for follower in self.followers.values():
            follower.stop()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.find()
            except OSError as e:  # the home going away under a test, say
                log.warning("looking for bridges to read ahead for: %s", e)
            self._stopping.wait(FIND)

    def find(self) -> None:
        """Follow the bridges that run, forget those that ended."""
        for socket, follower in list(self.followers.items()):
            if not follower.alive():
                del self.followers[socket]
        for socket, reads_log in bridges.logged(self.ctx):
            if socket not in self.followers:
                prefetch = None
                if self.prefetch:
                    record = import_state.path(self.ctx, socket.stem)  # the socket is the disk's
                    prefetch = Prefetch(self.budget, record.exists)
                follower = Follower(socket, reads_log, self.most, prefetch, self.ahead, self.block)
                self.followers[socket] = follower.start()
