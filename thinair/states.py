"""The states thinair keeps and reads, as enums, with the one table of the moves
each may make and the one guard the flows use (what qemu.qmp does with its
Runstate and `@require`).

- VmPhase, ExportPhase: what a flow intends for the record (written before it
  acts, so that a crash leaves a phase the reconciler finishes or undoes);
- JobState: where a job is in its life;
- DomainState: what libvirt says a domain is doing (read, never written);
- VmState: what the API shows of a VM: its domain's state, or its phase while
  it has no domain to speak of yet (creating, converting).

The values are the strings the database columns and the API always held, so a
StrEnum compares equal to them and no stored row changes. This module is at
the bottom of the layers: it imports nothing of thinair but its errors.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Protocol, TypeVar

from thinair.errors import Conflict, ThinairError


class VmPhase(StrEnum):
    CREATING = "creating"  # overlays and domain being made; undone if left
    CONVERTING = "converting"  # created; virt-v2v runs over its overlays (a convert job)
    READY = "ready"  # the flows may use it
    REMOVING = "removing"  # being removed; finished if left


class ExportPhase(StrEnum):
    CREATING = "creating"
    READY = "ready"
    REMOVING = "removing"


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# A job in one of these is to be run (or is being run) by an engine.
JOB_ACTIVE: tuple[JobState, ...] = (JobState.PENDING, JobState.RUNNING)


class DomainState(StrEnum):
    """A libvirt domain's state as thinair reads it (adapters/virt.py)."""

    RUNNING = "running"  # also libvirt's "blocked"
    PAUSED = "paused"
    STOPPING = "stopping"  # shutting down
    STOPPED = "stopped"  # shut off
    CRASHED = "crashed"
    SUSPENDED = "suspended"  # by the guest (S3/S4)
    MISSING = "missing"  # no such domain
    UNKNOWN = "unknown"  # libvirt has no state for it, or its host does not answer


# A domain in one of these has a QEMU process.
DOMAIN_LIVE: tuple[DomainState, ...] = (DomainState.RUNNING, DomainState.PAUSED)
# A domain in one of these has none, and its disks are free.
DOMAIN_DOWN: tuple[DomainState, ...] = (DomainState.STOPPED, DomainState.MISSING)


class VmState(StrEnum):
    """A VM's `state` in the API: its domain's, or its phase before it has one."""

    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"
    SUSPENDED = "suspended"
    MISSING = "missing"
    UNKNOWN = "unknown"
    CREATING = "creating"
    CONVERTING = "converting"


S = TypeVar("S", VmPhase, ExportPhase, JobState)

# The one table: for each kind of state, where each state may go. A record is
# made in the first state of its kind (creating, pending); a move to the same
# state is allowed where a step is done again after a crash (a second removal,
# a job resumed by another engine).
TRANSITIONS: dict[type[StrEnum], dict[str, frozenset[str]]] = {
    VmPhase: {
        VmPhase.CREATING: frozenset({VmPhase.READY, VmPhase.CONVERTING}),
        VmPhase.CONVERTING: frozenset({VmPhase.READY}),
        VmPhase.READY: frozenset({VmPhase.REMOVING}),
        VmPhase.REMOVING: frozenset({VmPhase.REMOVING}),
    },
    ExportPhase: {
        ExportPhase.CREATING: frozenset({ExportPhase.READY}),
        ExportPhase.READY: frozenset({ExportPhase.REMOVING}),
        ExportPhase.REMOVING: frozenset({ExportPhase.REMOVING}),
    },
    JobState: {
        JobState.PENDING: frozenset({JobState.RUNNING}),
        JobState.RUNNING: frozenset(
            {JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
        ),
        JobState.SUCCEEDED: frozenset(),
        JobState.FAILED: frozenset(),
        JobState.CANCELLED: frozenset(),
    },
}


class InvalidTransition(RuntimeError):
    """A move the table does not allow: a bug in thinair, not a user's error."""


def can_move(current: str, new: S) -> bool:
    return new in TRANSITIONS[type(new)].get(current, frozenset())


def move(current: str, new: S) -> S:
    """`new`, if the table allows the move from `current` to it; raises
    InvalidTransition otherwise. `record.phase = move(record.phase, VmPhase.READY)`."""
    if not can_move(current, new):
        raise InvalidTransition(f"{type(new).__name__}: {current!r} cannot become {new.value!r}")
    return new


class _Phased(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def phase(self) -> str: ...


def require_phase(
    record: _Phased | None,
    *allowed: VmPhase | ExportPhase,
    what: str = "VM",
    error: Callable[[str], ThinairError] = Conflict,
    message: str | None = None,
) -> None:
    """The guard of every flow that needs a VM (or an export) in one of `allowed`:
    raises `error` (Conflict: "VM 'web1' is creating") otherwise; a record that
    is gone (None) fails it too, with `message` if given."""
    if record is not None and record.phase in allowed:
        return
    if message is None:
        message = f"{what} {record.name!r} is {record.phase}" if record else f"the {what} is gone"
    raise error(message)
