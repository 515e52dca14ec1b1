"""thinair: run virtual machines out of thin air.

Start a VM in seconds on a temporary copy-on-write disk whose data lives on a
remote image, copy the data home in the background, or roll it all back.

The public Python SDK is re-exported here: ``thinair.Client``.
"""

from thinair.client import Client, Job, ThinairAPIError, Vm
from thinair.version import __version__

__all__ = ["Client", "Job", "ThinairAPIError", "Vm", "__version__"]
