"""Readahead: a cached bridge fetches ahead of the guest's sequential reads.

Over distance, a guest reading a file one block after another pays one round
trip per block of its bridge's cache (1 MiB per 25 ms is 40 MiB/s), whatever
the link carries. nbdkit 1.32 has no readahead that helps: its readahead filter
prefetches with `.cache` calls, which its filters serve one block per round
trip. So the engine follows each cached bridge's reads log (below the cache:
misses only) and, where RUN misses came one after another (a sequential run),
streams the next window of the source's data into the cache ahead of the
guest: reads of PIECE bytes at most, queued in order on STREAMS connections of
its own, so that the blocks the guest reads next come first and the link stays
busy (one request at a time per connection: the bridge's retry filter
serializes each connection's requests). The bridge's cache (nbdkit's cow
filter) locks no fetch, so the guest's hits never wait for a read ahead. Two
misses in a row already start a small probe, so that the run's first window is
on its way before the guest has read the probe. A probe or a stream starts one
block after the miss that made it: the guest asks for that block before a
read of it would be answered. The guest's hits do not reach the log, so the
stream goes on only when the guest misses again near its end (it caught up):
each window is what the link carries in FIRST_SECONDS, and twice the last one
while the run goes on, up to MOST_SECONDS of the link and `most` bytes (a
guest that stops reading leaves at most that much fetched for nothing, and on a
thin link a read ahead makes the guest's other reads wait for the link). What
the link carries is the rate of the follower's last windows (until it has one,
the guest's misses, which count the round trip in). It reads only what the
source's allocation map says is data (asked once per bridge), never zeros.
Random reads fetch nothing ahead, and neither does a source as near as the
cache (the guest's misses take less than NEAR): there the guest's own reads are
as quick. A miss of the guest in a new place drops what is still queued.
Nothing is streamed while an import of the disk copies the source
(`importing`): a mirror's reads through the bridge are sequential, and on a
loaded machine even a near source's misses took NEAR (16 mirrors at once, 2
cores), so its streams added connections to the source and load for nothing.
A stream has at most STREAMS connections (and the follower one more, for the
allocation map and the prefetch): a source serves a few clients only
(`qemu-nbd --shared=8`, as vdsm's exports), and the guest and an import's
copier need theirs.

The cow filter drops no block, so the follower also stops the cache from
keeping more once it fetched `limit` bytes (it removes the bridge's `keep`
file); what the guest reads after that crosses the link each time.

Its connections open the export READAHEAD_EXPORT, so the log tells its reads
from the guest's. An import's copier counts them as the guest's (they are done
for it) and reads what they fetched from the bridge's cache, not over the link
again. One follower thread per bridge, found by its files under
THINAIR_HOME/bridges: a bridge started again (its log starts over), an engine
started again, a VM gone (its bridge's socket gone) need nothing else. An
optimization only: a read ahead that fails costs the time it took.

With a `Prefetch`, a follower also fetches the rest of the source's data into
the cache, at the lowest priority: one read of what the link carries in
PREFETCH_SECONDS at a time (whole cache blocks, at most PREFETCH_MOST; the
link's rate from the log's times of the follower's own misses, which a block
already cached does not shorten), then as long again with the link left idle
(REST), from the start of the data to its end, only while the
guest's bridge has no read of its own out and had none for QUIET seconds, and
only from a far source (as the guest's misses say, or, before it had two, the
prefetch's own first miss, one block). A guest read that comes while a piece
is out waits for the link; REST halves how often that happens (100 Mbit/s, a
read every 0.5-1.5 s: a median read as with no prefetch, against 2.4x without
REST). Then the guest's later reads are local, and an import of the disk reads
them from the cache, not over the link again. It stops where the cache would
stop keeping blocks (`budget`), and while an import of the disk copies the
source (`importing`: the copier reads what the cache holds from it, the rest from
the source).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
# Two misses in a row start a probe: what the link carries in PROBE_SECONDS
# (a block at least, PROBE_MOST at most), one block past the guest's next one,
# so that if the guest's next miss makes a run, the guest reads the probe while
# the stream's first window is on its way (with no probe, the guest's fourth
# block was a round trip too; with 3 MiB, its seventh often was). Among random
# reads a probe is fetched for nothing now and then: PROBE_SECONDS bounds what
# that costs the guest's next read on a thin link.
PROBE_SECONDS = 0.2
ENDS = 16  # the guest's last misses remembered
# A stream's windows: what the link carries in FIRST_SECONDS, then twice the
# last one while the run goes on, up to MOST_SECONDS of the link.
FIRST_SECONDS = 1.0
MOST_SECONDS = 2.0
# A stream's reads: whole cache blocks, PIECE at most, and none that holds a
# whole aligned HUGE range: each is cut at the middle of a HUGE range. The
# cache writes what a read fetched in one write to its file, and Linux keeps a
# write that covers an aligned 2 MiB range in one 2 MiB page (a folio) of its
# page cache; in a VM such a page can cost the host backing it: 256 MiB written
# in 4 MiB writes took 0.6 s of CPU here, in 1 MiB writes or 2 MiB ones at odd
# MiB offsets 0.04 s (bench/page_cache_writes.py). With 4 MiB reads the bridge
# spent 2 ms of CPU per MiB streamed, on 2 cores the guest's, and the bench's
# sequential reads ran at half the speed.
PIECE = 2 * MiB
HUGE = 2 * MiB
STREAMS = 4  # connections a stream's reads are queued on
PROBE_MOST = STREAMS * PIECE  # one read on each connection
NEAR = 0.008  # seconds: a miss this quick is from a source as near as the cache
POLL = 0.005  # seconds between looks at a log that is being written to
IDLE_POLL = 0.05  # ... at one that has been quiet for IDLE seconds
IDLE = 2.0
FIND = 1.0  # seconds between looks for bridges started or gone
CONNECT_TIMEOUT = 5.0
# Seconds the connections stay open after a read ahead (opening one is a
# round trip more); one left open for good would keep the bridge from exiting
# when it is stopped (nbdkit waits for its clients).
HOLD = 0.5
# The prefetch: each read is what the link carries in PREFETCH_SECONDS (so that
# is what a guest read that comes meanwhile waits for the link at most), at
# most PREFETCH_MOST (nbdkit takes at most 64 MiB in one request), and it reads
# only once the guest has had no miss for QUIET.
PREFETCH_SECONDS = 0.1
PREFETCH_MOST = 32 * MiB
QUIET = 0.5
REST = 1.0  # after each piece, the link is left idle for as long as it took

# What a stream's next window is (see Follower._stream).
Kind = Literal["probe", "run", "onward"]


@dataclass(frozen=True)
class Prefetch:
    """The whole source fetched into the cache in the background (see the
    module's docstring)."""

    budget: int = 0  # bytes the cache may fetch in all before it drops blocks; 0: no limit


class _Window:
    """A stream's window: its reads queued, for what the link carries (from
    its first read's start: a window queued behind another waits for it)."""

    def __init__(self, size: int, pieces: int) -> None:
        self.size, self.left = size, pieces
        self.began: float | None = None


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
        keep: Path | None = None,
        limit: int = 0,
        importing: Callable[[], bool] = lambda: False,
    ) -> None:
        self.socket = socket
        self.tail = nbdkit.LogTail(reads_log)
        self.block = block  # the cache's: what is read ahead is whole blocks
        self.most = max(most - most % block, block)
        self.piece = max(block, PIECE - PIECE % block)
        self.keep, self.limit = keep, limit  # the cache keeps blocks while `keep` exists
        # An import of the disk copies the source: no stream and no prefetch
        # then (see the module's docstring).
        self.importing = importing
        self.stopping = threading.Event()
        self.stop_at = 0.0  # when stop() was called
        # Where the guest's last misses ended, and how many misses in a row led there.
        self.ends: OrderedDict[int, int] = OrderedDict()
        self.behind, self.ahead = 0, 0  # the stream of the run that goes on: [behind, ahead)
        self.window = 0  # its last window's size
        self.marker = 0  # the block its last window left for the guest to miss
        self.rate: float | None = None  # bytes/s the link carries, for the stream
        self.took: deque[float] = deque(maxlen=4)  # the guest's last misses, seconds each
        self.own_took: deque[float] = deque(maxlen=4)  # ... and this follower's own
        self.window_rates: deque[float] = deque(maxlen=4)  # bytes/s of the last windows
        self.miss_rates: deque[float] = deque(maxlen=4)  # ... of its own last misses
        self.map_at = 0.0  # not before: asking the allocation map failed
        self.sent: dict[tuple[bytes, bytes], nbdkit.Logged] = {}  # misses unanswered
        self.fetched = 0  # bytes read ahead, for the log and tests
        self.windows = 0  # windows streamed, for tests
        self.probes = 0  # ... and probes
        self.handle: nbd.NBD | None = None  # open while a run goes on (see HOLD)
        # The stream's reads, their connections (those not reading), and what is queued.
        self.pool = concurrent.futures.ThreadPoolExecutor(STREAMS, "readahead-stream")
        self.lock = threading.Lock()  # for the three below, which the stream's reads change
        # Each with a buffer of its own: a new one for each read (the bindings'
        # pread) made the reads fault in fresh pages, the CPU the guest's wanted.
        self.idle: list[tuple[nbd.NBD, nbd.Buffer]] = []
        self.queued: list[concurrent.futures.Future[None]] = []
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
        self.stop_at = time.monotonic()
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
                if start is not None and not self.importing():
                    self._stream(*start)
                    fetched_at = now
                elif self._streaming():
                    fetched_at = now
                elif self.data is None and self.ahead_on and self.far and now >= self.map_at:
                    # The source's allocation map, before a run needs it
                    # (asking it takes round trips).
                    self._map()
                elif self._prefetch_due(now) and self._prefetch_next():
                    fetched_at = time.monotonic()
                elif now - fetched_at > HOLD:
                    self._disconnect()
                if start is not None or self.tail.offset != seen:
                    quiet_since, seen = now, self.tail.offset
                self.stopping.wait(POLL if now - quiet_since < IDLE else IDLE_POLL)
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self._disconnect()
        if self.fetched:
            log.info("read ahead %d MiB for the guest of %s", self.fetched // MiB, self.socket)
        if self.prefetched and not self.prefetch_done:
            log.info("prefetched %d MiB for %s", self.prefetched // MiB, self.socket)

    def step(self) -> tuple[int, Kind] | None:
        """Look at what the log says since the last look: where to stream from
        if a sequential run goes on past what is cached, and how (a probe, a
        new run's first window, the next window of the run going on)."""
        found = self.tail.new()
        if self.tail.restarted:  # a bridge started again: an empty cache
            self.ends.clear()
            self.sent.clear()
            self.behind, self.ahead = 0, 0
            self.cursor, self.missed, self.prefetch_done = 0, 0, False
        start: int | None = None
        kind: Kind = "run"
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
                # In the stream: a block still on its way, or the window's
                # marker (or its end): the guest reached it, the stream goes on.
                if read.offset >= self.marker:
                    start, kind = self.ahead, "onward"
                self.ends[end] = RUN
                continue
            run = self.ends.pop(read.offset, 0) + 1
            if run >= RUN - 1:
                start, kind = end, "run" if run >= RUN else "probe"
            self.ends[end] = run
            while len(self.ends) > ENDS:
                self.ends.popitem(last=False)
        self._keep_within_limit()
        if start is None or not (self.far and self.ahead_on):
            return None
        return start, kind

    def _keep_within_limit(self) -> None:
        """Once the cache fetched `limit` bytes, it keeps no more (see the
        module's docstring)."""
        if self.keep is None or not self.limit or self.missed < self.limit:
            return
        if self.keep.exists():
            self.keep.unlink(missing_ok=True)
            log.info(
                "the cache of %s fetched %d MiB: it keeps no more blocks",
                self.socket,
                self.missed // MiB,
            )

    @property
    def far(self) -> bool:
        """The guest's last misses all took NEAR or more (two at least: the
        first read from a near source may be slow, its file not yet in memory)."""
        return len(self.took) >= 2 and min(self.took) >= NEAR

    def _measure(self, read: nbdkit.Logged) -> None:
        """How far the source is, from the log's times of each miss: the
        guest's tell whether the source is near (see `far`: then no read ahead
        pays) and, until the follower measured its own reads, what the link
        carries (they count the round trip in); its own, for the prefetch,
        whether the source is far."""
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
            self.miss_rates.append(began.count / took)
        elif not self.window_rates:
            self.rate = began.count / took

    def _measured(self, size: int, took: float) -> None:
        """A stream's window, all its reads done: the fastest of the last few
        is what the link carries (a small window is mostly round trip, and
        taken alone it would shrink the next one to what a round trip carries)."""
        if took > 0:
            with self.lock:
                self.window_rates.append(size / took)
                self.rate = max(self.window_rates)

    def _bytes(self, seconds: float, most: int, rate: float | None = None) -> int:
        """What the link carries in `seconds` at `rate` (the stream's, by
        default), in whole blocks, at least one, at most `most` (all of it,
        before anything was measured)."""
        rate = self.rate if rate is None else rate
        n = most if rate is None else min(most, int(rate * seconds))
        return max(self.block, n - n % self.block)

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

    def _map(self) -> None:
        try:
            self._connect()
        except (nbd.Error, nbd_client.NBDProbeError, CopyError) as e:
            log.debug("asking the allocation map through %s: %s", self.socket, e)
            self._disconnect()
            self.map_at = time.monotonic() + CONNECT_TIMEOUT  # a bridge gone, say

    def _stream(self, start: int, kind: Kind) -> None:
        """Queue the reads of the next window (see the module's docstring):
        the run's stream going on from `start`, or a new run's or a probe's, one
        block past `start` (what was still queued for another run is dropped).
        One block half way through a run's window is left out: the guest's miss
        of it says it reached it, and the next window is queued then. A probe
        leaves none out: the guest's next miss (of the block before it) makes the
        run, and the run's first window comes after the probe."""
        try:
            _, data = self._connect()
        except (nbd.Error, nbd_client.NBDProbeError, CopyError) as e:
            log.debug("reading ahead at %d through %s: %s", start, self.socket, e)
            self._disconnect()  # connect again next time (a bridge started again)
            return
        if kind == "onward" and self.window:
            size = min(2 * self.window, self._bytes(MOST_SECONDS, self.most))
        elif kind == "probe":
            size = min(PROBE_MOST, self._bytes(PROBE_SECONDS, self.most))
        else:  # a run's first window (after its probe, or not)
            size = self._bytes(FIRST_SECONDS, self.most)
        if kind != "onward":  # a new place
            self._drop_queued()
            self.behind = start  # the guest reads that block itself
            start += self.block
        # Only data: what reads as zeros would cross the link for nothing.
        i = bisect.bisect_right(data, (start, float("inf"))) - 1
        if i < 0 or start >= data[i][1]:
            i += 1  # in a hole: from the next extent on
            if i == len(data):
                return
            start = data[i][0]
        start = max(start - start % self.block, data[i][0])
        end = min(start + size, data[i][1])
        self.ahead = end
        if kind == "probe":  # its marker: the guest's next block, before it
            self.window, self.marker = 0, self.behind
            self.probes += 1
            pieces = self._pieces(start, end)
        else:
            self.window = end - start
            half = (end - start) // 2
            self.marker = start + half - half % self.block
            if self.marker == start:  # a window of one block
                self.marker = end
            pieces = self._pieces(start, self.marker) + self._pieces(self.marker + self.block, end)
            self.windows += 1
        window = _Window(sum(n for _, n in pieces), len(pieces))
        with self.lock:
            self.queued = [f for f in self.queued if not f.done()]
            for at, length in pieces:
                self.queued.append(self.pool.submit(self._read, at, length, window))
        log.debug("streaming %d MiB at %d MiB", (end - start) // MiB, start // MiB)

    def _pieces(self, first: int, stop: int) -> list[tuple[int, int]]:
        """[first, stop) in reads of whole blocks, PIECE at most, each cut at
        the middle of a HUGE range (see PIECE), where the cache's blocks allow."""
        pieces = []
        while first < stop:
            end = min(stop, first + self.piece)
            if (HUGE // 2) % self.block == 0:
                end = min(end, first - (first - HUGE // 2) % HUGE + HUGE)
            pieces.append((first, end - first))
            first = end
        return pieces

    def _read(self, offset: int, length: int, window: _Window) -> None:
        """One read of a stream, on a connection not reading."""
        with self.lock:
            handle, buffer = self.idle.pop() if self.idle else (None, nbd.Buffer(self.piece))
            if window.began is None:
                window.began = time.monotonic()
        try:
            if handle is None:
                url = NbdAddress.unix(str(self.socket), export=nbdkit.READAHEAD_EXPORT).url()
                handle = nbd_client.connect(url, CONNECT_TIMEOUT)
            into = buffer if length == self.piece else nbd.Buffer(length)
            cookie = handle.aio_pread(into, offset)
            # A read the bridge holds (its source gone, retried) is given up
            # CONNECT_TIMEOUT after the follower was told to stop (stop()
            # waits for this thread), and at once when the bridge is stopped
            # (its socket gone first: nbdkit waits for its clients to leave).
            while not handle.aio_command_completed(cookie):
                if self.stopping.is_set() and time.monotonic() > self.stop_at + CONNECT_TIMEOUT:
                    raise nbd.Error("the follower stopped", 0)
                if not self.socket.exists():
                    raise nbd.Error("the bridge stopped", 0)
                handle.poll(100)
        except (nbd.Error, nbd_client.NBDProbeError) as e:
            log.debug("reading ahead at %d through %s: %s", offset, self.socket, e)
            if handle is not None:
                # Its read given up may still be out: a shutdown would wait
                # for its reply (libnbd 1.14 has no close(); the handle is
                # freed with this frame).
                with contextlib.suppress(nbd.Error):
                    handle.aio_disconnect(0)
            return
        with self.lock:
            self.idle.append((handle, buffer))
            self.fetched += length
            window.left -= 1
            done = window.left == 0
        if done and window.began is not None:
            self._measured(window.size, time.monotonic() - window.began)

    def _streaming(self) -> bool:
        with self.lock:
            return any(not f.done() for f in self.queued)

    def _drop_queued(self) -> None:
        with self.lock:
            for f in self.queued:
                f.cancel()
            self.queued = [f for f in self.queued if not f.done()]

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
        return not self._streaming() and not self.importing()

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
            # tells whether the source is far. What the link carries comes
            # from the log's times of the follower's own misses: a read's own
            # time counts what it found in the cache (a piece the guest had
            # fetched came back in 1 ms: 100 MiB, more than nbdkit takes).
            block = self.block
            rate = max(self.miss_rates) if self.miss_rates else self.rate
            size = self._bytes(PREFETCH_SECONDS, PREFETCH_MOST, rate)
            if self._far_for_prefetch() is None or rate is None:
                size = block
            end = min(self.cursor - self.cursor % block + size, data[i][1])
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
        """Close the follower's connections (those of the stream not reading)."""
        with self.lock:
            handles, self.idle = [h for h, _ in self.idle], []
        if self.handle is not None:
            handles.append(self.handle)
            self.handle = None
        for handle in handles:
            with contextlib.suppress(nbd.Error):
                handle.shutdown()


class Readahead:
    """A thread of the engine: a Follower for every cached bridge that runs."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.most = ctx.settings.bridge_readahead_max_mib * MiB
        self.block = ctx.settings.bridge_cache_block_kib * 1024
        self.limit = ctx.settings.bridge_cache_max_mib * MiB
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
                record = import_state.path(self.ctx, socket.stem)  # the socket is the disk's
                prefetch = Prefetch(self.budget) if self.prefetch else None
                follower = Follower(
                    socket,
                    reads_log,
                    self.most,
                    prefetch,
                    self.ahead,
                    self.block,
                    bridges.keep_file(reads_log),
                    self.limit,
                    record.exists,
                )
                self.followers[socket] = follower.start()
