"""The errors thinair raises, each with a stable code the API and SDK carry.

    ThinairError
     +-- InvalidInput        bad names, sizes, URLs, options (nothing was done)
     +-- NotFound            no such storage domain, VM, disk, job
     +-- Conflict            name taken, wrong state, another flow holds the VM
     +-- ExternalDiskError   the external disk cannot be used (unreachable, ...)
     +-- StorageError        a storage domain is missing, unwritable or full
     +-- BackendError        libvirt, QEMU or a tool failed unexpectedly

HTTP status codes are chosen in the API's handlers, not here.
"""

from __future__ import annotations


class ThinairError(Exception):
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ThinairError):
    code = "invalid_input"


class NotFound(ThinairError):
    code = "not_found"


class Conflict(ThinairError):
    code = "conflict"


class ExternalDiskError(ThinairError):
    code = "external_disk"


class StorageError(ThinairError):
    code = "storage"


class BackendError(ThinairError):
    code = "backend"
