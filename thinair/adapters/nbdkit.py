"""nbdkit as a local bridge in front of a remote NBD export.

QEMU reads an NBD external disk through `nbdkit --filter=retry nbd uri=...` on
a Unix socket rather than from the remote server itself, for two reasons:
- a source server that restarts must not cost the guest its disk. QEMU's own
  NBD client can reconnect (reconnect-delay), but libvirt 9.0 drops that option
  from disk XML; the retry filter reconnects and retries each request for up to
  `window` seconds, so the guest only stalls;
- TLS with a pre-shared key: libvirt's disk XML has X.509 only. The bridge holds
  the key (libnbd's `tls-psk-file`), so it is in neither the domain XML nor
  QEMU's command line, and QEMU talks plain NBD over a local socket only QEMU's
  user may open.
Over distance, every read the guest makes costs a round trip (QEMU's NBD client
keeps at most 16 requests in flight, and a booting guest reads small blocks one
after another). With a `Cache`, an NBD bridge keeps what it read in a local cache
in blocks of `block_kib`: a miss fetches the whole block in one request, so the
small reads after it cost no round trip, and no block crosses the link twice
while the bridge runs. The cache is nbdkit's cow filter with `cow-on-read`, not
its cache filter: the cache filter (1.32) holds one lock for every connection
across each fetch, so a guest's hits wait for whatever another connection
fetches (a read ahead, a prefetch), where the cow filter locks only its map of
blocks. It keeps blocks while the file `keep` exists (the cow filter's
`cow-on-read=PATH`): the cow filter drops no block, so the engine removes that
file once the cache fetched its limit, and what is read after that crosses the
link each time. The cache is a deleted file in the bridge's
directory. Below the cache, nbdkit's log filter writes every read that crosses
the link (a miss) to `reads_log`: what a boot read, for
thinair.engine.working_sets; where the guest's misses run one after another, so
that thinair.engine.readahead fetches ahead of them; and, while an import copies
the source, whether the guest is reading from it right now (`ReadsWatch`), so
that the copier lets the guest's reads go first.
A disk inside a tar file (an OVA's VMDK) is read the same way, through the tar
filter over the file or curl plugin (see `source_args`), so it is never unpacked.
The bridge runs detached (it must outlive the engine as long as the VM runs on
it); it is found again by its pid file and command line. The binary can be
overridden with THINAIR_NBDKIT.
"""

from __future__ import annotations

import os
import pwd
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode

from thinair.adapters import procfs
from thinair.adapters._process import StartFailed, start_detached
from thinair.adapters.errors import AdapterError

PROGRAMS = frozenset({"nbdkit"})


class BridgeError(AdapterError):
    pass


def _binary() -> str:
    return os.environ.get("THINAIR_NBDKIT", "nbdkit")


@dataclass(frozen=True)
class Cache:
    """Latency hiding for an NBD source (see the module's docstring)."""

    block_kib: int = 1024  # a power of 2, >= 4
    # Where to log what the cache fetches from the source (nbdkit's log filter
    # below the cache: misses only), for thinair.engine.working_sets and ReadsWatch.
    reads_log: Path | None = None
    # The cache keeps what it fetched while this file exists (made by `start`);
    # None: always.
    keep: Path | None = None


def start(
    uri: str,
    socket: Path,
    pid_file: Path,
    window: float,
    owner: str | None,
    cache: Cache | None = None,
) -> int:
    """Start a read-only bridge to `uri` listening on `socket`; return its pid.
    `owner` (QEMU's user under qemu:///system) gets the socket."""
    socket.unlink(missing_ok=True)
    if cache is not None and cache.keep is not None:
        cache.keep.touch()
    argv = [_binary(), "--readonly", "--unix", str(socket), "--pidfile", str(pid_file)]
    argv += source_args(uri, window, cache)
    try:
        # nbdkit forks into the background once the socket is listening. The
        # cache's file (deleted once open) goes beside the socket.
        pid = start_detached(argv, pid_file, env={**os.environ, "TMPDIR": str(socket.parent)})
    except StartFailed as e:
        raise BridgeError(e.reason, argv, e.detail) from e
    give_socket(socket, owner)
    return pid


def give_socket(socket: Path, owner: str | None) -> None:
    """Let only `owner` (and root) open the socket."""
    if owner:
        try:
            entry = pwd.getpwnam(owner)
        except KeyError:
            pass
        else:
            os.chown(socket, entry.pw_uid, entry.pw_gid)
    os.chmod(socket, 0o600)


def source_args(uri: str, window: float, cache: Cache | None = None) -> list[str]:
    """nbdkit's filters, plugin and parameters that read `uri`: an NBD URI
    (libnbd's), an http(s) URL, or thinair's ``tar+file:///PATH#ENTRY`` and
    ``tar+http(s)://...#ENTRY`` for member ENTRY of a tar file. Remote reads go
    through the retry filter, retrying for up to `window` seconds. `cache`
    applies to NBD sources only (over curl, nbdkit 1.32 serializes requests)."""
    delay = 1
    retry = [
        f"retries={max(1, int(window / delay))}",
        f"retry-delay={delay}",
        "retry-exponential=no",
    ]
    tar: list[str] = []
    if uri.startswith("tar+"):
        inner, _, entry = uri.removeprefix("tar+").partition("#")
        tar = ["--filter=tar", f"tar-entry={unquote(entry)}"]
        if inner.startswith("file://"):
            return [tar[0], "file", f"file={inner.removeprefix('file://')}", tar[1]]
        uri = inner
    if uri.startswith(("http://", "https://")):
        return [*tar[:1], "--filter=retry", "curl", f"url={uri}", *tar[1:], *retry]
    if cache is None:
        return ["--filter=retry", "nbd", *_plugin_args(uri), *retry]
    # Outermost first: the cache's misses go through the retry filter to the
    # source. (nbdkit's readahead filter gave nothing here: its prefetches are
    # `.cache` calls, which nbdkit's filters serve one block per round trip.)
    keep = str(cache.keep) if cache.keep is not None else "true"
    params = [f"cow-on-read={keep}", f"cow-block-size={cache.block_kib}K"]
    filters = ["--filter=cow"]
    if cache.reads_log is not None:
        filters.append("--filter=log")
        params.append(f"logfile={cache.reads_log}")
    filters.append("--filter=retry")
    return [*filters, "nbd", *_plugin_args(uri), *retry, *params]


def _plugin_args(uri: str) -> list[str]:
    """The nbd plugin's parameters for a libnbd URI. The plugin takes the TLS
    files as parameters of its own (libnbd would refuse them inside the URI, as
    local file access), and they name files, never the key itself."""
    params = {"tls-psk-file": "tls-psk", "tls-certificates": "tls-certificates"}
    base, _, query = uri.partition("?")
    pairs = parse_qsl(query)
    args = [f"{params[k]}={v}" for k, v in pairs if k in params]
    if not args:
        return [f"uri={uri}"]
    kept = urlencode([(k, v) for k, v in pairs if k not in params], safe="/")
    return [f"uri={base}?{kept}" if kept else f"uri={base}", *args]


def running(socket: Path, pid_file: Path) -> int | None:
    """The pid of the bridge serving `socket`, if it still runs."""
    return procfs.from_pid_file(pid_file, PROGRAMS, str(socket))


def stop(socket: Path, pid_file: Path) -> None:
    pid = running(socket, pid_file)
    # The socket goes first: nbdkit exits only once its clients have left, and
    # the engine's readahead lets go of a bridge whose socket is gone (its
    # reads still out kept a stopped bridge alive until it was killed, 5 s on).
    socket.unlink(missing_ok=True)
    if pid is not None:
        procfs.terminate(pid, PROGRAMS, str(socket))
    pid_file.unlink(missing_ok=True)


# The log filter's lines for a read: "connection=C Read id=N ..." when it
# starts, "connection=C ...Read id=N return=..." when it is answered; a client
# connecting: "connection=C Connect export=NAME ..." (NAME quoted as a shell would).
_LOGGED = re.compile(
    rb"connection=([0-9]+) (\.\.\.)?Read id=([0-9]+)"
    rb"(?: offset=0x([0-9a-f]+) count=0x([0-9a-f]+)| return=(-?[0-9]+))?"
)
_CONNECT = re.compile(rb"connection=([0-9]+) Connect export=(\S*)")
GRAIN = 64 * 2**10  # what `covers` knows of: 64 KiB pieces of the source
# The export name thinair.engine.readahead and the working set's prefetch connect
# to a bridge with (the nbd plugin ignores it): their reads are told from the
# guest's in the log.
READAHEAD_EXPORT = "thinair-readahead"


@dataclass(frozen=True)
class Logged:
    """A read in a bridge's log: started (`answered` None) or answered."""

    connection: bytes
    id: bytes
    at: float  # when (the log's clock, seconds since the epoch)
    offset: int = 0
    count: int = 0
    answered: int | None = None  # its return value: 0, or -1 on an error


def _when(line: bytes) -> float:
    """The time a log line starts with ("2026-12-02 16:48:12.179352 ...")."""
    try:
        return datetime.fromisoformat(line[:26].decode()).timestamp()
    except ValueError:
        return 0.0


class LogTail:
    """A bridge's reads log, read incrementally: `new()` parses what was written
    since the last call. A log that shrank or was made again is a new one (a
    bridge started again): `restarted` is set and it is read from its start.
    The connections opened with READAHEAD_EXPORT are in `own`."""

    def __init__(self, reads_log: Path) -> None:
        self.path = reads_log
        self.offset = 0
        self.partial = b""
        self.own: set[bytes] = set()
        self.restarted = False
        self.inode: int | None = None

    def new(self) -> list[Logged]:
        self.restarted = False
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size < self.offset or self.inode not in (None, st.st_ino):
                    self.offset, self.partial, self.own = 0, b"", set()
                    self.restarted = True
                self.inode = st.st_ino
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        found = []
        for line in lines:
            m = _LOGGED.search(line)
            if m is None:
                c = _CONNECT.search(line)
                if c is not None and c.group(2).strip(b"'\"") == READAHEAD_EXPORT.encode():
                    self.own.add(c.group(1))
                continue
            at = _when(line)
            if m.group(2):
                ret = m.group(6)
                found.append(Logged(m.group(1), m.group(3), at, answered=int(ret or b"-1")))
            else:
                offset, count = int(m.group(4) or b"0", 16), int(m.group(5) or b"0", 16)
                found.append(Logged(m.group(1), m.group(3), at, offset, count))
        return found


class ReadsWatch:
    """Whether a bridge is reading from its source right now, from its reads log
    (misses only: reads that cross the link): `busy()` is True while one of its
    reads is unanswered and, with `linger`, for `hold` seconds after the last
    one was answered (a guest reads one block after another: on a thin link,
    what a copier sends in that gap is queued ahead of the guest's next read).
    The log is read incrementally, at most every `period` seconds; a missing log
    (a bridge with no cache, or one not started yet) reads as idle. It also
    keeps which ranges the bridge fetched (`covers`): those are in its cache,
    and a copier of the source can read them there rather than over the link
    again (unless the cache let them go, past its size)."""

    def __init__(self, reads_log: Path, hold: float = 0.25, period: float = 0.02) -> None:
        self.hold = hold
        self.period = period
        self.lock = threading.Lock()
        self.tail = LogTail(reads_log)
        self.open: dict[tuple[bytes, bytes], tuple[int, int]] = {}  # unanswered reads
        self.fetched: set[int] = set()  # GRAIN pieces answered
        self.last = float("-inf")  # when a read was last seen going or answered
        self.checked = float("-inf")
        self.reads = 0  # reads seen starting

    def busy(self, linger: bool = True) -> bool:
        with self.lock:
            now = time.monotonic()
            self._look(now)
            return bool(self.open) or (linger and now - self.last < self.hold)

    def _look(self, now: float) -> None:
        """Read what the log gained, at most every `period` (asked per request
        of a copy: py-spy found 3% of an import's samples reopening the log)."""
        if now - self.checked >= self.period:
            self.checked = now
            self._scan(now)

    def _scan(self, now: float) -> None:
        found = self.tail.new()
        if self.tail.restarted:  # a new log, a new cache
            self.open, self.fetched = {}, set()
        for read in found:
            key = (read.connection, read.id)
            if read.answered is not None:
                offset, count = self.open.pop(key, (0, 0))
                if read.answered == 0 and count:
                    self.fetched.update(range(offset // GRAIN, -(-(offset + count) // GRAIN)))
            else:
                self.open[key] = (read.offset, read.count)
                self.reads += 1
            self.last = now

    def covers(self, offset: int, length: int) -> bool:
        """Whether the bridge fetched all of [offset, offset + length)."""
        with self.lock:
            self._look(time.monotonic())
            first, end = offset // GRAIN, -(-(offset + length) // GRAIN)
            return all(i in self.fetched for i in range(first, end))
