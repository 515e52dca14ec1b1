"""thinair: run virtual machines out of thin air.

Start a VM in seconds on a temporary copy-on-write disk whose data lives on a
remote image, copy the data home in the background, or roll it all back.

The public Python SDK is re-exported here: ``thinair.Client``, and the states
its objects are in (``thinair.VmPhase.READY``, ``thinair.JobState.CANCELLED``, ...).
"""

from thinair.client import Client, Job, ThinairAPIError, Vm
from thinair.states import DomainState, ExportPhase, JobState, VmPhase, VmState
from thinair.version import __version__

__all__ = [
    "Client",
    "DomainState",
    "ExportPhase",
    "Job",
    "JobState",
    "ThinairAPIError",
    "Vm",
    "VmPhase",
    "VmState",
    "__version__",
]
