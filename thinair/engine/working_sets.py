"""Boot working sets: what a source's first boot read, fetched first by the next
VM from the same source.

Provisioning many VMs from one template, or a second preview of one backup,
boots the same blocks in the same order. An NBD bridge with its cache logs every
block it fetches from the source (nbdkit's log filter, between the cache and the
retry filter: cache misses only, in the order fetched). The blocks of a disk's
first `working_set_seconds` are kept for its source in
THINAIR_HOME/working-sets/, when its bridge stops or when another VM's bridge to
the same source starts. A new bridge to a source with a working set then
prefetches it into its cache, from the moment the VM is created, on a connection
of its own (the readahead's export: the log tells its reads from the guest's):
the blocks that touch merged into runs, one read each (the cache filter fetches
a run of missing blocks in one request to the source, and holds its lock while
it does), the runs in the order the first boot read them. The guest's boot reads
then hit the cache.
An optimization only: a prefetch that fails costs nothing but the time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from datetime import datetime
from pathlib import Path

from thinair.adapters import nbd_client, nbdkit
from thinair.adapters.nbd_address import NbdAddress
from thinair.engine.context import EngineContext

log = logging.getLogger(__name__)

IN_FLIGHT = 4  # the cache filter serves one at a time: enough to keep it busy
RUN_MOST = 32 * 2**20  # bytes per read (the readahead's largest)

_READ = re.compile(
    r"^(\S+ \S+) connection=\d+ Read id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)", re.M
)


def _dir(ctx: EngineContext) -> Path:
    path = ctx.settings.home / "working-sets"
    path.mkdir(mode=0o755, exist_ok=True)
    return path


def path_for(ctx: EngineContext, url: str) -> Path:
    return _dir(ctx) / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.json"


def blocks(ctx: EngineContext, url: str) -> list[tuple[int, int]] | None:
    """The source's working set, (offset, length) in the order first read."""
    try:
        data = json.loads(path_for(ctx, url).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if data.get("url") != url:
        return None
    return [(int(o), int(n)) for o, n in data["blocks"]]


def parse(text: str, seconds: float) -> list[tuple[int, int]]:
    """The distinct reads of a bridge's log within `seconds` of its first one."""
    found: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    first: datetime | None = None
    for m in _READ.finditer(text):
        try:
            at = datetime.fromisoformat(m.group(1))
        except ValueError:
            continue
        first = first or at
        if (at - first).total_seconds() > seconds:
            break
        block = (int(m.group(2), 16), int(m.group(3), 16))
        if block not in seen:
            seen.add(block)
            found.append(block)
    return found


def record(ctx: EngineContext, url: str, reads_log: Path) -> bool:
    """Keep the working set of `url` from a bridge's log, unless it has one; True
    if it was recorded now."""
    target = path_for(ctx, url)
    if target.exists():
        return False
    try:
        text = reads_log.read_text(errors="replace")
    except FileNotFoundError:
        return False
    found = parse(text, ctx.settings.working_set_seconds)
    if not found:
        return False
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "blocks": found}))
    os.replace(tmp, target)
    log.info("working set of %s: %d blocks, %d bytes", url, len(found), sum(n for _, n in found))
    return True


def runs(wanted: list[tuple[int, int]], most: int = RUN_MOST) -> list[tuple[int, int]]:
    """The ranges of `wanted` (in the order first read) merged where they touch
    or overlap, at most `most` bytes each, each run placed where the first of
    its ranges was read."""
    ranked = sorted(enumerate(wanted), key=lambda item: item[1][0])
    merged: list[list[int]] = []  # [first read, start, end]
    for rank, (offset, length) in ranked:
        if merged and offset <= merged[-1][2]:
            last = merged[-1]
            last[0], last[2] = min(last[0], rank), max(last[2], offset + length)
        else:
            merged.append([rank, offset, offset + length])
    found = []
    for _, start, end in sorted(merged):
        found += [(at, min(most, end - at)) for at in range(start, end, most)]
    return found


def prefetch(ctx: EngineContext, url: str, socket: Path) -> threading.Thread | None:
    """Fetch the working set of `url` through the bridge at `socket`, in a thread."""
    wanted = blocks(ctx, url)
    if not wanted:
        return None
    thread = threading.Thread(
        target=_prefetch, args=(url, socket, runs(wanted)), name="prefetch", daemon=True
    )
    thread.start()
    return thread


def _prefetch(url: str, socket: Path, wanted: list[tuple[int, int]]) -> None:
    began = time.monotonic()
    try:
        bridge = NbdAddress.unix(str(socket), export=nbdkit.READAHEAD_EXPORT).url()
        nbd_client.prefetch(bridge, wanted, IN_FLIGHT, timeout=30)
    except nbd_client.NBDProbeError as e:
        log.info("prefetch of %s stopped: %s", url, e)
        return
    log.info(
        "prefetched the working set of %s (%d runs) in %.2f s",
        url,
        len(wanted),
        time.monotonic() - began,
    )
