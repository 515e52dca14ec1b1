"""What an import has done for one disk, kept across jobs.

The bulk copy of an external disk is a copy of a source that never changes, so
it stays valid after a failed or interrupted job: the next import of the disk
resumes it from its checkpoint instead of reading the source again. The record
lives beside the engine's database, in THINAIR_HOME/imports/DISK_ID.json (with
the copier's digests in DISK_ID.digests), and names the volume it is building;
rollback, remove and the reconciler delete both.

Phases, in order; each is written (and synced) before the step it names starts
to matter:
- copy: the bulk copy into `dest` is under way from `checkpoint` on (the
  copier's digest file says how far: see nbd_copy);
- verified: the bulk copy holds every source byte, checked against the digests;
- mirror: QEMU is merging the temporary disk's clusters (the guest's writes)
  into `dest`; a mirror that did not finish is started again (it copies every
  cluster of the temporary disk again, so what it left is overwritten);
- switching: `dest` holds everything the guest wrote and is synced, the guest
  is paused: from here `dest` is the disk, whatever happens to QEMU;
- merging (a stopped VM instead of mirror and switching): the temporary disk
  has `dest` as its backing file now and its clusters are being committed into
  it: the temporary disk over `dest` is the disk until the commit is done.
From switching or merging on there is no going back: the job can only finish.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from thinair.adapters.nbd_copy import Checkpoint
from thinair.engine.context import EngineContext

COMMITTED = ("switching", "merging")  # the phases with no going back


@dataclass
class DiskImport:
    disk_id: str
    dest: str  # the volume being made on the target storage domain
    dest_format: str
    to: str  # the target storage domain's id
    method: str  # bulk (the copier, then a shallow merge) or mirror (QEMU copies all)
    phase: str = "copy"
    checkpoint: Checkpoint = field(default_factory=lambda: Checkpoint(0, 0, 0))
    total: int = 0  # the source's allocated bytes, once known


def _dir(ctx: EngineContext) -> Path:
    path = ctx.settings.home / "imports"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def path(ctx: EngineContext, disk_id: str) -> Path:
    return _dir(ctx) / f"{disk_id}.json"


def digests_path(ctx: EngineContext, disk_id: str) -> Path:
    return _dir(ctx) / f"{disk_id}.digests"


def load(ctx: EngineContext, disk_id: str) -> DiskImport | None:
    try:
        data = json.loads(path(ctx, disk_id).read_text())
    except FileNotFoundError:
        return None
    data["checkpoint"] = Checkpoint(**data["checkpoint"])
    return DiskImport(**data)


def save(ctx: EngineContext, state: DiskImport) -> None:
    """Write the record durably: a new file, synced, renamed over the old one."""
    final = path(ctx, state.disk_id)
    tmp = final.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(asdict(state), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def discard(ctx: EngineContext, disk_id: str, keep: str | None = None) -> None:
    """Forget the disk's import and delete the volume it was making (unless that
    volume is `keep`, the disk's own volume now)."""
    state = load(ctx, disk_id)
    if state is not None and state.dest != keep:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state.dest)
    for leftover in (path(ctx, disk_id), digests_path(ctx, disk_id)):
        leftover.unlink(missing_ok=True)


def known(ctx: EngineContext) -> list[str]:
    """The disks with an import record."""
    return [p.stem for p in _dir(ctx).glob("*.json")]
