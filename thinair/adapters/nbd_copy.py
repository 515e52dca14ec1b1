"""libnbd: copy an NBD export's data into a local file, fast, resumable, verified.

Why not nbdcopy: it copies as fast, but it cannot start at an offset (an
interrupted copy starts again from zero, reading the source twice), and it says
nothing of what it read, so a copy cannot be checked without reading the source
again. This copier keeps the properties that make nbdcopy fast (several
connections, many requests in flight on each, only the allocated extents read,
holes left as holes) and adds:
- a checkpoint: every offset below `done_to` is on the destination, and a
  digest of each request it read is in the digest file, so a copy killed at any
  instant resumes from its last checkpoint. Only the last checkpoint is synced:
  one taken on the way is not (a sync per checkpoint made the copy 1.3-1.5x
  slower here: each one flushes the host's write cache, and the writes queue
  behind it), so it records the boot it was taken in, and the digest file is
  its record (a caller need keep only the first of a run); a process killed
  loses nothing it wrote (the page cache has it), and after the host went down
  the copy resumes from the first request that does not read back as recorded;
- a digest per request (XXH3-128), checked against the destination read back
  as soon as the request's write-back to disk is done; a request counts as
  copied (and goes into a checkpoint) only once it is checked.

libnbd's Python bindings serialize blocking calls on one handle, so each
connection runs its own thread with asynchronous reads in flight; the digests
and os.pwrite release the GIL on large buffers, so the threads overlap.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

import nbd
import xxhash

from thinair.adapters import nbd_client
from thinair.adapters.errors import AdapterError

log = logging.getLogger(__name__)

# Two connections: on these 2-core machines four made the copy 30% slower than
# two (the threads contend for the GIL and the cores the servers need), and two
# with 16 reads of 2 MiB in flight each keep up with nbdcopy's 4 x 64 x 256 KiB
# on a source 25 ms away (8 in flight came to 0.75x). Reads of 1 MiB made the
# copier alone faster when its buffers' memory had gone back to this VM's host
# (0.96 s for 1 GiB against 1.17-1.40), but the import slower (1.33-1.50 s
# against 1.12-1.43, in one run): 2 MiB stays.
CONNECTIONS = 2
IN_FLIGHT = 16  # per connection
REQUEST = 2 * 2**20  # bytes per read: large, so a slow link costs few round trips
CHECKPOINT_BYTES = 64 * 2**20
CHECKPOINT_SECONDS = 2.0
CONNECT_TIMEOUT = 10.0
# Seconds with reads on the wire and no reply at all before the connection is
# taken for dead and its reads are sent again on a new one. QEMU 7.2's curl
# driver (a qemu-nbd decoding a qcow2 chain over HTTP) was seen here to leave
# concurrent reads unanswered for good until another read came in. Long enough
# for one read of REQUEST bytes on a link of 0.6 Mbit/s.
STALL = 30.0
# A record of the digest file: offset, length, digest of the bytes read there.
_RECORD = struct.Struct("<QI16s")


def _digest(data: bytes | bytearray | memoryview) -> bytes:
    """XXH3-128 (the xxhash package): a digest to catch a copy that differs from
    what was read (a bug, a bad disk), not an attacker; at several GB/s, hashing
    each byte twice (as read, and read back) costs a tenth of what SHA-256 does
    here, where the copier competes for 2 cores with the servers it reads."""
    return xxhash.xxh3_128(data).digest()


_STATE_ZERO = 2  # NBD base:allocation: the range reads as zeros


# sync_file_range(2), which the os module lacks. Like nbdcopy, the copier starts
# the write-back of each request as soon as it is written and, a few requests
# later, waits for it: without that, the page cache fills with dirty pages and
# the kernel throttles every writer (measured here: 3x slower than nbdcopy).
# Then it reads the request back, checks its digest and drops its pages, as
# nbdcopy drops them: the kernel reuses the same few pages for the whole copy.
# Checked later (by a thread of its own, after each checkpoint), the pages
# lingered and cost system time (1 GiB: 1.33 s, 1.12 s of it system time,
# against nbdcopy's 0.93 s; checked at once: 0.94 s).
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4
WRITEBACK_WINDOW = 8  # requests per connection written but not yet waited for
PACE_POLL = 0.01  # seconds between looks while the pacer holds reads back
PART = 128 * 2**10  # bytes per read on a thin link (see _Pacer)


def _sync_range(fd: int, offset: int, length: int, flags: int) -> None:
    if _libc.sync_file_range(fd, offset, length, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class CopyError(AdapterError):
    pass


class CopyMismatch(CopyError):
    """The copy read back does not hold what the copier read."""

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length
        super().__init__(f"the copy differs from what was read in [{offset}, {offset + length})")


class CopyStopped(Exception):
    """should_stop() said so; the checkpoint before it is valid."""


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int


@dataclass(frozen=True)
class Checkpoint:
    done_to: int  # everything below is copied, synced, digested and read back
    digest_bytes: int  # the digest file's length at that point
    copied: int  # data bytes copied below done_to
    # The digest file's bytes whose requests were read back and match: all of
    # them, but in a checkpoint of an engine that checked them later.
    verified: int = 0
    # Not synced: the boot (boot_id()) whose page cache holds what it says;
    # "" once synced to disk.
    boot: str = ""


def boot_id() -> str:
    """This boot of the host: a page cache that outlived a process outlives no boot."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _connect(url: str, timeout: float, meta: bool = True) -> nbd.NBD:
    try:
        return nbd_client.connect(url, timeout, allocation_map=meta)
    except nbd_client.NBDProbeError as e:
        raise CopyError(f"{url}: {e}") from e


def data_extents(h: nbd.NBD, start: int, size: int) -> Iterator[Extent]:
    """The ranges of [start, size) that do not read as zeros, merged, from the
    server's allocation map (all of it where the server has none)."""
    if not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        if start < size:
            yield Extent(start, size - start)
        return
    pending: Extent | None = None
    offset = start
    while offset < size:
        found: list[tuple[int, int]] = []

        def on_extents(
            context: str, at: int, entries: list[int], err: list[int], found: list = found
        ) -> int:
            if context == nbd.CONTEXT_BASE_ALLOCATION:
                found.extend(zip(entries[0::2], entries[1::2], strict=True))
            return 0

        h.block_status(min(size - offset, 2**31), offset, on_extents)
        if not found:
            raise CopyError(f"the server gave no allocation map at offset {offset}")
        for length, flags in found:
            length = min(length, size - offset)
            if length <= 0:
                break
            if not flags & _STATE_ZERO:
                if pending and pending.offset + pending.length == offset:
                    pending = Extent(pending.offset, pending.length + length)
                else:
                    if pending:
                        yield pending
                    pending = Extent(offset, length)
            offset += length
    if pending:
        yield pending


def _requests(extents: list[Extent]) -> Iterator[Extent]:
    for e in extents:
        for off in range(e.offset, e.offset + e.length, REQUEST):
            yield Extent(off, min(REQUEST, e.offset + e.length - off))


class _Throttle:
    """At most `rate` bytes per second over all connections (a token bucket)."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.next_free = time.monotonic()

    def wait(self) -> float:
        """Seconds until the next request may go (0: now)."""
        if not self.rate:
            return 0.0
        with self.lock:
            return max(0.0, self.next_free - time.monotonic())

    def take(self, nbytes: int) -> None:
        if self.rate:
            with self.lock:
                self.next_free = max(self.next_free, time.monotonic()) + nbytes / self.rate


class _Pacer:
    """How many reads the copy keeps in flight over all its connections, and
    when it holds back, so that on a thin link the guest's own reads go first.

    A link with little bandwidth queues what is sent faster than it carries:
    32 reads of 2 MiB in flight on 100 Mbit/s are 5 s of queue, and a guest
    read waits behind it (measured: 1.3 s for a 4 KiB read, 0.13 s alone).
    So the number in flight follows the reads' own latency, as LEDBAT does:
    while a read takes no more than `target` seconds longer than the fastest
    of its size seen (the link's own time, no queue), one more may go; past
    it, a quarter fewer (never below one). On a fast or a merely distant link
    the latency does not grow with the reads in flight and all of them go.
    Below THIN_RATE (bytes/s) the link is thin: requests are read in parts of
    PART bytes, so that little is in flight when the guest starts reading, and
    the target is lower. And while `guest_busy(linger)` says the guest is
    reading from the same source (its bridge's misses), no new read goes at
    all; on a thin link also for a moment after its last read (`linger`: the
    guest's next read would queue behind what goes in the gap), on a fast one
    only while a read of the guest's is on the link (there, what the copier
    sends is carried in milliseconds: lingering after a VM's boot reads held
    the copy of 1 GiB back 0.2-0.3 s of its 1.5 s here)."""

    QUEUE_TARGET = 0.1
    THIN_QUEUE_TARGET = 0.02
    THIN_RATE = 32 * 2**20
    START = 4

    def __init__(self, most: int, guest_busy: Callable[[bool], bool] | None) -> None:
        self.most = most
        self.guest_busy = guest_busy
        self.lock = threading.Lock()
        self.limit = float(min(self.START, most))
        self.in_flight = 0
        self.base: dict[int, float] = {}  # the fastest read of each size
        self.held = 0.0  # seconds spent holding back for the guest
        self.held_since: float | None = None
        self.is_thin = False
        self.since = time.monotonic()
        self.bytes = 0  # read since `since`

    def hold(self) -> bool:
        """True while no new read may go (the guest reads); counts the time."""
        busy = self.guest_busy is not None and self.guest_busy(self.is_thin)
        with self.lock:
            now = time.monotonic()
            if busy and self.held_since is None:
                self.held_since = now
            elif not busy and self.held_since is not None:
                self.held += now - self.held_since
                self.held_since = None
        return busy

    def thin(self) -> bool:
        return self.is_thin

    def acquire(self) -> bool:
        """One more request may go now (counted in flight)."""
        with self.lock:
            if self.in_flight >= int(self.limit):
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def observe(self, seconds: float, nbytes: int) -> None:
        """A read of `nbytes` succeeded in `seconds`."""
        with self.lock:
            now = time.monotonic()
            self.bytes += nbytes
            if now - self.since >= 1.0:
                self.is_thin = self.bytes / (now - self.since) < self.THIN_RATE
                self.since, self.bytes = now, 0
            base = self.base[nbytes] = min(self.base.get(nbytes, seconds), seconds)
            target = self.THIN_QUEUE_TARGET if self.is_thin else self.QUEUE_TARGET
            if seconds - base > target:
                self.limit = max(1.0, self.limit * 0.75)
            else:
                self.limit = min(float(self.most), self.limit + 1)


class _Plan:
    """The requests to issue in offset order, and which have completed, so that
    the contiguous prefix that is done can be checkpointed."""

    def __init__(self, requests: list[Extent], end: int) -> None:
        self.requests = requests
        self.end = end
        self.lock = threading.Lock()
        self.next_index = 0
        self.done: dict[int, bytes] = {}  # index -> digest, completed past the prefix
        self.prefix = 0  # requests[:prefix] are complete
        self.error: BaseException | None = None

    def take(self) -> tuple[int, Extent] | None:
        with self.lock:
            if self.error is not None or self.next_index >= len(self.requests):
                return None
            i = self.next_index
            self.next_index += 1
            return i, self.requests[i]

    def complete(self, index: int, digest: bytes) -> None:
        with self.lock:
            self.done[index] = digest

    def fail(self, error: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = error

    def advance(self) -> tuple[int, list[tuple[Extent, bytes]]]:
        """Move the prefix over what completed; (the offset below which all is
        done, the requests newly in the prefix with their digests)."""
        with self.lock:
            newly = []
            while self.prefix in self.done:
                newly.append((self.requests[self.prefix], self.done.pop(self.prefix)))
                self.prefix += 1
            done_to = (
                self.requests[self.prefix].offset if self.prefix < len(self.requests) else self.end
            )
            return done_to, newly


def _worker(
    url: str,
    h: nbd.NBD,
    plan: _Plan,
    fd: int,
    throttle: _Throttle,
    pacer: _Pacer,
    progress: Callable[[int], None],
    window: float,
    cached: tuple[str, Callable[[int, int], bool]] | None = None,
    stall: float = STALL,
) -> None:
    """One connection: keep IN_FLIGHT reads going; write and digest each one.
    Reads land in buffers of our own, reused (no copy, no allocation per read).
    A read that fails, a connection that drops (a source server restarting) or
    one that answers nothing for `stall` seconds, is retried on a new
    connection for up to `window` seconds."""
    # Buffers are made as reads go out (up to IN_FLIGHT), of anonymous memory
    # that the kernel maps as the reads land: 16 bytearrays of 2 MiB made up
    # front were 32 MiB zeroed, GIL held, before the first read went out.
    free: list[mmap.mmap] = []
    pending: dict[int, tuple[Extent, mmap.mmap]] = {}  # in flight, by request index
    retry: list[tuple[int, Extent]] = []  # reads to issue again, on a new connection
    failing_since: float | None = None
    last_error = ""
    written_back: list[tuple[int, Extent, bytes]] = []  # (index, request, digest), oldest first
    parts: list[tuple[int, Extent, memoryview, int]] = []  # in pending, next part to read
    reading: set[int] = set()  # requests with a read on the wire (one slot of the pacer's each)
    near: nbd.NBD | None = None  # a connection to `cached`'s URL, once needed
    cached_off = [False]
    last_reply = time.monotonic()  # or when the wire last went from idle to busy

    def write(index: int, req: Extent, view: memoryview) -> None:
        """Write the request, start its write-back; settle the oldest one."""
        digest = _digest(view)
        written = 0
        while written < req.length:
            written += os.pwrite(fd, view[written:], req.offset + written)
        _sync_range(fd, req.offset, req.length, _WRITE)
        progress(req.length)
        written_back.append((index, req, digest))
        if len(written_back) > WRITEBACK_WINDOW:
            settle()

    def settle() -> None:
        """Wait for the oldest request's write-back, read it back and check
        it, drop its pages: then it is done. It reads the page cache in
        place (mapped): a read into a buffer of ours cost 0.1-0.2 s of system
        time per GiB more, a copy nbdcopy does not make."""
        index, req, digest = written_back.pop(0)
        _sync_range(fd, req.offset, req.length, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
        if _mapped_digest(fd, req.offset, req.length) != digest:
            raise CopyMismatch(req.offset, req.length)
        os.posix_fadvise(fd, req.offset, req.length, os.POSIX_FADV_DONTNEED)
        plan.complete(index, digest)

    def issue() -> bool:
        item = retry.pop() if retry else plan.take()
        if item is None:
            return False
        index, req = item
        throttle.take(req.length)
        if (
            cached
            and not cached_off[0]
            and cached[1](req.offset, req.length)
            and read_near(index, req)
        ):
            pacer.release()  # its slot: nothing went over the link
            return True
        buf = free.pop() if free else mmap.mmap(-1, REQUEST)
        pending[index] = (req, buf)
        send(index, req, memoryview(buf)[: req.length], 0)
        return True

    def read_near(index: int, req: Extent) -> bool:
        """Read the request where a copy of it is near (the guest's bridge has
        it in its cache); False if that cannot be read (read over the link)."""
        nonlocal near
        assert cached is not None
        try:
            if near is None:
                near = _connect(cached[0], CONNECT_TIMEOUT, meta=False)
            data = near.pread(req.length, req.offset)
        except (nbd.Error, CopyError) as e:
            log.info("reading %s from %s: %s; from the source instead", req, cached[0], e)
            cached_off[0] = True
            return False
        write(index, req, memoryview(data))
        return True

    def send(index: int, req: Extent, view: memoryview, start: int) -> None:
        """Read [start, ...) of the request: all of it, or on a thin link one
        part of PART bytes (the next goes once it is in)."""
        nonlocal last_reply
        part = req.length - start
        if pacer.thin():
            part = min(part, PART)
        sent = time.monotonic()

        def done(err: Any) -> int:
            nonlocal failing_since, last_error, last_reply
            if index not in reading:
                return 1  # given up on already (its connection died)
            last_reply = time.monotonic()
            reading.discard(index)
            pacer.release()
            if not err.value:
                failing_since = None
                pacer.observe(time.monotonic() - sent, part)
                if start + part < req.length:
                    parts.append((index, req, view, start + part))
                    return 1
            del pending[index]
            try:
                if err.value:
                    retry.append((index, req))
                    last_error = f"reading {req.length} bytes at {req.offset}: " + os.strerror(
                        err.value
                    )
                    failing_since = failing_since or time.monotonic()
                    return 1
                failing_since = None
                write(index, req, view)
            except BaseException as e:  # ENOSPC, or a copy that reads back wrong
                plan.fail(e)
            finally:
                free.append(view.obj)  # type: ignore[arg-type]
            return 1

        if not reading:
            last_reply = sent
        reading.add(index)
        try:
            into = nbd.Buffer.from_buffer(view[start : start + part])
            h.aio_pread(into, req.offset + start, completion=done)
        except nbd.Error:
            give_up_in_flight()
            raise

    def give_up_in_flight() -> None:
        """The connection is dead: what it had in flight is read again later."""
        for index, (req, buf) in pending.items():
            retry.append((index, req))
            free.append(buf)
        for _ in reading:
            pacer.release()
        pending.clear()
        parts.clear()
        reading.clear()

    def reconnect() -> nbd.NBD:
        """A new connection, once the in-flight reads are back (failed) or
        given up on. The old one is dropped, not shut down: a shutdown waits
        for the server to close it, which one that answers nothing never does."""
        nonlocal failing_since
        failing_since = failing_since or time.monotonic()
        with contextlib.suppress(nbd.Error):
            h.aio_disconnect(0)
        while True:
            if plan.error is not None:
                raise CopyStopped()
            try:
                return _connect(url, CONNECT_TIMEOUT, meta=False)
            except CopyError as e:
                if time.monotonic() - failing_since > window:
                    raise CopyError(f"{last_error or e} (for {window:g} s)") from e
                time.sleep(1)

    try:
        more = True
        while True:
            delay = 0.0
            if retry and not pending and failing_since is not None:
                if time.monotonic() - failing_since > window:
                    raise CopyError(f"{url}: {last_error} (for {window:g} s)")
                h = reconnect()
            while parts and failing_since is None and not pacer.hold() and pacer.acquire():
                try:
                    send(*parts.pop(0))
                except nbd.Error as e:
                    last_error = f"{url}: {e.string or e}"
                    failing_since = failing_since or time.monotonic()
            if failing_since is not None:  # read again, whole, once the connection is back
                for index, req, view, _ in parts:
                    del pending[index]
                    retry.append((index, req))
                    free.append(view.obj)  # type: ignore[arg-type]
                parts.clear()
            while (more or retry) and len(pending) < IN_FLIGHT and plan.error is None:
                if failing_since is not None and pending:
                    break  # let the others fail or succeed first
                delay = throttle.wait()
                if delay > 0:
                    break
                if pacer.hold() or not pacer.acquire():
                    delay = PACE_POLL
                    break
                try:
                    more = issue()
                    if not more:
                        pacer.release()
                    more = more or bool(retry)
                except nbd.Error as e:
                    last_error = f"{url}: {e.string or e}"
                    failing_since = failing_since or time.monotonic()
                    break
            if parts:
                delay = PACE_POLL  # held back: look again soon
            if plan.error is not None:
                more = False
                retry.clear()
            if not pending:
                while written_back:  # nothing in flight: nothing better to do
                    settle()
                if not more and not retry:
                    break
                if failing_since is None:
                    time.sleep(delay)
                continue
            # Completions are handled in poll: never sleep with reads in flight.
            try:
                h.poll(int(min(delay, 1.0) * 1000) if delay > 0 else 1000)
            except nbd.Error as e:  # the connection dropped
                last_error = f"{url}: {e.string or e}"
                failing_since = failing_since or time.monotonic()
            if h.aio_is_dead() or h.aio_is_closed():
                failing_since = failing_since or time.monotonic()
                give_up_in_flight()
            elif reading and time.monotonic() - last_reply > stall:
                n = len(reading)
                last_error = f"no reply to {n} read{'s' if n > 1 else ''} in {stall:g} s"
                log.warning("%s: %s; reading again on a new connection", url, last_error)
                failing_since = failing_since or time.monotonic()
                give_up_in_flight()  # h is dropped (reconnect) before a buffer is reused
    except BaseException as e:
        plan.fail(e)
    finally:
        # What was written is checked, and counts, however the copy ends: a
        # stopped or failed copy resumes from after it.
        try:
            while written_back:
                settle()
        except BaseException as e:
            plan.fail(e)
        with contextlib.suppress(nbd.Error):
            if h.aio_in_flight():  # a shutdown would wait for replies that may not come
                h.aio_disconnect(0)
            else:
                h.shutdown()
        # Freed now, its socket closed, though a traceback of this frame (a
        # failed copy's error) lives on: libnbd 1.14's bindings have no close(),
        # so the name is rebound to a handle that never connects.
        h = nbd.NBD()
        if near is not None:
            with contextlib.suppress(nbd.Error):
                near.shutdown()


def copy(
    url: str,
    dest: str,
    digest_file: str,
    start: Checkpoint | None = None,
    bandwidth: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    connections: int = CONNECTIONS,
    window: float = 30.0,
    guest_busy: Callable[[bool], bool] | None = None,
    cached: tuple[str, Callable[[int, int], bool]] | None = None,
    stall: float = STALL,
) -> Checkpoint:
    """Copy the export at `url` into the file `dest` (created sparse with the
    export's size if missing), from `start` on (a checkpoint of an earlier run,
    whose data and digests are kept), and check the copy read back against the
    digests of what was read. Calls on_progress(copied, total) as data lands and
    on_checkpoint once each checkpoint is written (synced: the last one). A
    source that fails, drops the connection or answers nothing for `stall`
    seconds is retried for up to `window` seconds. While
    `guest_busy(linger)` says a guest reads from the same source, no new read
    goes (see _Pacer).
    With `cached` (an NBD URL holding some of the same bytes nearer, and
    whether it holds a range: the guest's bridge and its cache), a request
    it holds is read there, so that nothing crosses the link twice.
    Returns the final checkpoint,
    everything read back and checked; raises CopyStopped when should_stop() says so,
    CopyMismatch when the copy read back differs, and CopyError on a source or
    destination failure (the last checkpoint stays valid)."""
    start = start or Checkpoint(0, 0, 0)
    start = _resume_point(dest, digest_file, start)
    if start.verified < start.digest_bytes:  # a checkpoint of an engine that checked later
        mismatch = verify(dest, digest_file, start.verified, start.digest_bytes)
        if mismatch is not None:
            raise CopyMismatch(mismatch.offset, mismatch.length)
        start = replace(start, verified=start.digest_bytes)
    first = _connect(url, CONNECT_TIMEOUT)
    size = first.get_size()
    extents = list(data_extents(first, start.done_to, size))
    total = start.copied + sum(e.length for e in extents)
    handles = [first]
    # More connections only where the server says they see the same data
    # (multi-conn), as nbdcopy does: it also tells a server that takes several
    # clients from one that serves one at a time (qemu-nbd without --shared)
    # and would keep a second connection waiting.
    if first.can_multi_conn():
        for _ in range(connections - 1):
            try:
                handles.append(_connect(url, CONNECT_TIMEOUT, meta=False))
            except CopyError:
                break
    plan = _Plan(list(_requests(extents)), size)
    throttle = _Throttle(bandwidth)
    pacer = _Pacer(len(handles) * IN_FLIGHT, guest_busy)
    copied = [start.copied]
    copied_lock = threading.Lock()

    def progress(nbytes: int) -> None:
        with copied_lock:
            copied[0] += nbytes

    fd = os.open(dest, os.O_RDWR | os.O_CREAT, 0o644)  # read: each request is read back
    digests = open(digest_file, "ab")  # noqa: SIM115 (closed below)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        digests.truncate(start.digest_bytes)
        digests.seek(start.digest_bytes)
        running = threading.Semaphore(0)  # released by each worker as it ends

        # Each worker takes its connection from the list and owns it: one it
        # drops is freed, its socket closed, so a server that takes a set number
        # of clients (qemu-nbd --shared) has room for the new one.
        del first

        def work() -> None:
            try:
                _worker(
                    url, handles.pop(), plan, fd, throttle, pacer, progress, window, cached, stall
                )
            finally:
                running.release()

        threads = [
            threading.Thread(target=work, name=f"copy-{i}", daemon=True)
            for i in range(len(handles))
        ]
        for t in threads:
            t.start()
        ended = 0
        checkpoint = start
        done_bytes = start.copied
        last_time = time.monotonic()
        while True:
            # Woken by a worker's end as well as every 0.1 s: the last one's
            # end goes straight to the final checkpoint.
            if running.acquire(timeout=0.1):
                ended += 1
            alive = ended < len(threads)
            if should_stop and should_stop():
                plan.fail(CopyStopped())
            if on_progress:
                on_progress(copied[0], total)
            now = time.monotonic()
            if (
                not alive
                or copied[0] - done_bytes >= CHECKPOINT_BYTES
                or now - last_time >= CHECKPOINT_SECONDS
            ):
                before = checkpoint
                checkpoint = _checkpoint(plan, fd, digests, checkpoint, synced=not alive)
                done_bytes, last_time = checkpoint.copied, now
                if on_checkpoint and checkpoint != before:
                    on_checkpoint(checkpoint)
            if not alive:
                break
        if plan.error is not None:
            raise plan.error
        if checkpoint.done_to != size:  # pragma: no cover - a bug, not a condition
            raise CopyError(f"copy ended at {checkpoint.done_to} of {size}")
        if pacer.held:
            log.info("the copy of %s held back %.1f s for the guest's reads", url, pacer.held)
        if on_progress:
            on_progress(total, total)
        return checkpoint
    finally:
        os.close(fd)
        digests.close()


def _checkpoint(
    plan: _Plan, fd: int, digests: BinaryIO, last: Checkpoint, synced: bool
) -> Checkpoint:
    """Record the digests of what is done (each request written back, read back
    and checked); `synced`: sync the data, then the digests, so that the data is
    on disk before anything says it is."""
    done_to, newly = plan.advance()
    if not newly and done_to == last.done_to and (last.boot == "" or not synced):
        return last
    if synced:
        os.fdatasync(fd)
    for req, digest in newly:
        digests.write(_RECORD.pack(req.offset, req.length, digest))
    digests.flush()
    if synced:
        os.fsync(digests.fileno())
    return Checkpoint(
        done_to=done_to,
        digest_bytes=digests.tell(),
        copied=last.copied + sum(req.length for req, _ in newly),
        verified=digests.tell(),
        boot="" if synced else boot_id(),
    )


def _resume_point(dest: str, digest_file: str, start: Checkpoint) -> Checkpoint:
    """Where a copy from `start` resumes. An unsynced checkpoint may be behind
    its digest file: a caller need not keep every checkpoint (each is appended
    there first), only the first unsynced one of a run, which names its boot.
    In that boot every record in the file stands (each was read back before it
    was written). If the host went down since, the records that read back as
    recorded do, up to the first that does not (lost with the page cache, or
    its record lost); the copy resumes from there, and the source is not read
    again for what survived."""
    if not start.boot:
        return start
    try:
        records = _records(digest_file)
    except FileNotFoundError:  # lost with the host too
        records = []
    this_boot = start.boot == boot_id()
    kept = Checkpoint(0, 0, 0)
    checks = (True for _ in records) if this_boot else _reads_back(dest, records)
    for (offset, length, _), ok in zip(records, checks, strict=False):
        if not ok:
            return replace(kept, done_to=offset, verified=kept.digest_bytes)
        kept = Checkpoint(offset + length, kept.digest_bytes + _RECORD.size, kept.copied + length)
    if kept.digest_bytes < start.digest_bytes:
        return replace(kept, verified=kept.digest_bytes)  # records lost: resume after the last
    # all of them, and the holes after them
    done_to = max(kept.done_to, start.done_to)
    return replace(kept, done_to=done_to, verified=kept.digest_bytes, boot=start.boot)


@dataclass(frozen=True)
class Mismatch:
    offset: int  # the first byte that differs is within [offset, offset + length)
    length: int


def verify(dest: str, digest_file: str, start: int = 0, end: int | None = None) -> Mismatch | None:
    """Read the copy back and check the digest of every request recorded in
    bytes [start, end) of the digest file; the first range that differs, or None.

    Each range is hashed where it lies in the page cache (mmap, populated in one
    call) rather than copied out first: on these 2-core machines the copy out
    cost a tenth of the whole import's time (1 GiB: 1.00 s against 0.89 s)."""
    records = _records(digest_file, start, end)
    for (offset, length, _), ok in zip(records, _reads_back(dest, records), strict=False):
        if not ok:
            return Mismatch(offset, length)
    return None


def _records(
    digest_file: str, start: int = 0, end: int | None = None
) -> list[tuple[int, int, bytes]]:
    """The whole records in bytes [start, end) of the digest file (a record
    cut short, torn, is left out)."""
    with open(digest_file, "rb") as f:
        f.seek(start)
        data = f.read() if end is None else f.read(end - start)
    return list(_RECORD.iter_unpack(data[: len(data) - len(data) % _RECORD.size]))


def _reads_back(dest: str, records: list[tuple[int, int, bytes]]) -> Iterator[bool]:
    """For each record (offset, length, digest), in order, whether `dest` holds
    bytes of that digest there (a record out of order or empty, torn, does not)."""
    try:
        fd = os.open(dest, os.O_RDONLY)
    except FileNotFoundError:
        yield from (False for _ in records)
        return
    try:
        size = os.fstat(fd).st_size  # a range past the end would fault (SIGBUS)
        end = 0
        for offset, length, digest in records:
            ok = end <= offset and length > 0 and offset + length <= size
            yield ok and _mapped_digest(fd, offset, length) == digest
            end = offset + length
            # Checked: its pages (clean, synced) leave the page cache, which a
            # copy of many GiB would otherwise fill, evicting what the guest uses.
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _mapped_digest(fd: int, offset: int, length: int) -> bytes:
    base = offset - offset % mmap.PAGESIZE
    flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
    with (
        mmap.mmap(fd, offset - base + length, flags, mmap.PROT_READ, offset=base) as m,
        memoryview(m) as view,
    ):
        return _digest(view[offset - base :])


def first_difference(url: str, dest: str, offset: int, length: int) -> int:
    """The first byte of [offset, offset + length) where `dest` differs from the
    export (read again: to name the byte a digest mismatch is about)."""
    h = _connect(url, CONNECT_TIMEOUT, meta=False)
    try:
        theirs = h.pread(length, offset)
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()
    fd = os.open(dest, os.O_RDONLY)
    try:
        ours = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    for i, (a, b) in enumerate(zip(theirs, ours, strict=False)):
        if a != b:
            return offset + i
    return offset + min(len(theirs), len(ours))
