"""libvirt: freeze one disk of a running domain behind an external overlay
(a disk-only snapshot without metadata), and merge the overlay back (an active,
shallow block commit, then a pivot). With these a running VM's disk can be
exposed as it was at one instant while the guest goes on writing.

Built on the connection and block-job events of thinair.adapters.virt.Virt.
"""

from __future__ import annotations

import time

from thinair.adapters import qemu_img
from thinair.adapters.errors import CommandFailed
from thinair.adapters.virt import JOB_COMPLETED, JOB_FAILED, JOB_READY, Virt
from thinair.errors import BackendError


def freeze(virt: Virt, name: str, target: str, overlay: str) -> None:
    """The guest's writes to `target` go to a new qcow2 `overlay` (libvirt makes
    it, backed by the current top) from now on; other disks are not touched."""
    virt.snapshot_disk(name, target, overlay)


def merge_back(virt: Virt, name: str, target: str, base: str, timeout: float = 600) -> None:
    """Commit the disk's top layer into `base` (the layer right under it) while
    the guest runs, and switch the guest back to `base`."""
    virt.block_commit(name, target, base)
    deadline = time.monotonic() + timeout
    # Ready means the base holds everything and mirrors new writes: only then pivot.
    while not virt.mirror_ready(name, target):
        status = virt.wait_block_event(name, target, 1.0)
        if status == JOB_FAILED:
            raise BackendError(f"merging {name} {target} back failed")
        if time.monotonic() > deadline:
            raise BackendError(f"merging {name} {target} back took more than {timeout:g} s")
        if status == JOB_READY:  # the event can come before the XML says so
            time.sleep(0.05)
    virt.block_events.clear(virt.uuid(name), target)
    virt.block_job_abort(name, target, pivot=True)
    while virt.block_job(name, target) is not None:
        status = virt.wait_block_event(name, target, 1.0)
        if status == JOB_COMPLETED:
            break
        if status == JOB_FAILED:
            raise BackendError(f"switching {name} {target} back failed")
        if time.monotonic() > deadline:
            raise BackendError(f"switching {name} {target} back took more than {timeout:g} s")


def merge_back_offline(overlay: str) -> None:
    """Commit a stopped guest's overlay into the layer under it (qemu-img)."""
    try:
        qemu_img.commit(overlay, keep=False, fmt=None)
    except CommandFailed as e:
        raise BackendError(f"cannot merge {overlay} back: {e}") from e
