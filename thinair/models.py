"""The API's data model (pydantic), shared by the engine's REST API and the SDK,
so there is one schema and no hand-kept copy of it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

# Names appear in paths, libvirt domain names and XML: keep them plain.
Name = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"),
    Field(
        description="1-64 characters: letters, digits, '.', '_', '-'; not starting with a symbol"
    ),
]


def utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


# Every time the API gives is UTC and says so (SQLite hands back naive ones).
Timestamp = Annotated[datetime, AfterValidator(utc)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Marks, in the OpenAPI document, a field naming a local file or a URL that may
# name one: the engine checks each against THINAIR_IMAGE_ROOTS (storage.check_location).
LOCAL_PATH: dict[str, Any] = {"x-thinair-local": "path"}
LOCAL_URL: dict[str, Any] = {"x-thinair-local": "url"}


class Error(_Model):
    code: str = Field(description="stable machine-readable error code")
    message: str = Field(description="what went wrong, for a person")


class StorageDomainCreate(_Model):
    name: Name
    path: str = Field(
        min_length=1,
        max_length=4096,
        description="an existing directory under THINAIR_IMAGE_ROOTS",
        json_schema_extra=LOCAL_PATH,
    )
    host: str | None = Field(
        default=None,
        description="the one host that reaches it; omitted: shared, mounted at the same "
        "path on every host and on the engine's machine (NFS, ...)",
    )


class StorageDomain(_Model):
    id: str
    name: str
    path: str
    total_bytes: int | None
    free_bytes: int | None
    available: bool
    created_at: Timestamp
    host: str | None = Field(default=None, description="the one host that reaches it")
    shared: bool = Field(default=True, description="every host reaches it")


class ExternalDisk(_Model):
    url: str = Field(
        min_length=1, max_length=4096, description="as QEMU reads it", json_schema_extra=LOCAL_URL
    )
    format: str | None = Field(default=None, description="raw, qcow2, ...; probed when omitted")
    tls: Literal["none"] = "none"


# The largest blank disk: QEMU's qcow2 allows more, but no storage domain here
# holds 64 TiB, and a typo of a few zeros should not go through.
MAX_BLANK_SIZE = 64 * 2**40


class BlankDisk(_Model):
    # strict: JSON true or "10G" is not a size
    virtual_size: int = Field(
        strict=True,
        ge=2**20,
        le=MAX_BLANK_SIZE,
        multiple_of=512,
        description="bytes the guest sees: 1 MiB to 64 TiB, a multiple of 512",
    )


class DiskCreate(_Model):
    external_disk: ExternalDisk | None = Field(
        default=None, description="the disk's data, read-only, at a URL (or give blank)"
    )
    blank: BlankDisk | None = Field(
        default=None,
        description="an empty local disk instead: a plain qcow2 volume on the storage "
        "domain, part of the VM (rollback deletes it)",
    )
    storage_domain: str | None = Field(
        default=None,
        description="name or id of the storage domain for the temporary (or blank) disk; "
        "may be omitted when there is only one",
    )
    check_readonly: bool = Field(
        default=True, description="refuse an NBD export that is not read-only"
    )

    @model_validator(mode="after")
    def _external_or_blank(self) -> DiskCreate:
        if (self.external_disk is None) == (self.blank is None):
            raise ValueError("give either external_disk or blank")
        return self


class ProbeRequest(_Model):
    url: str = Field(
        min_length=1, max_length=4096, description="as QEMU reads it", json_schema_extra=LOCAL_URL
    )
    format: str | None = Field(default=None, description="raw, qcow2, ...; probed when omitted")
    check_readonly: bool = Field(
        default=True, description="refuse an NBD export that is not read-only"
    )


class ProbeResult(_Model):
    url: str
    format: str = Field(description="as given, or as qemu-img detected it")
    virtual_size: int = Field(description="bytes the guest sees")
    read_only: bool | None = Field(description="the server says read-only; None where it cannot")


class Disk(_Model):
    id: str
    vm_id: str
    target: str
    storage_domain: str
    volume_path: str
    volume_format: str
    virtual_size: int
    location: Literal["external", "local"]
    external_disk: ExternalDisk | None
    blank: bool = Field(
        default=False,
        description="created empty with the VM, local from the start: rollback deletes "
        "it, where an imported disk makes rollback refuse",
    )


class VmCreate(_Model):
    name: Name | None = Field(default=None, description="required unless `ova` gives it")
    # strict: JSON true is not 1 CPU, nor "512" a size
    memory_mib: int = Field(default=512, ge=16, le=1024 * 1024, strict=True)
    cpus: int = Field(default=1, ge=1, le=64, strict=True)
    disks: list[DiskCreate] = Field(default_factory=list, max_length=26)
    ova: str | None = Field(
        default=None,
        max_length=4096,
        description="an OVA (path or http(s) URL) instead of disks: its OVF gives the "
        "disks and, unless given here, the name, memory and CPUs; no disk is unpacked",
        json_schema_extra=LOCAL_URL,
    )
    storage_domain: str | None = Field(
        default=None, description="with `ova`: the storage domain for the temporary disks"
    )
    host: str | None = Field(
        default=None,
        description="where to define it; omitted: the host with the most free memory "
        "among those that reach its storage domains",
    )
    convert: bool = Field(
        default=False,
        strict=True,
        description="run virt-v2v in place over the temporary disks before the VM is "
        "ready (a foreign guest gets virtio drivers): the VM comes back `converting` "
        "and a `convert` job (GET jobs?vm=ID) makes it ready, or undoes the create",
    )

    @model_validator(mode="after")
    def _disks_or_ova(self) -> VmCreate:
        if bool(self.disks) == bool(self.ova):
            raise ValueError("give either disks or an ova")
        if self.name is None and not self.ova:
            raise ValueError("a name is required")
        return self


class VmStart(_Model):
    host: str | None = Field(
        default=None,
        description="start it on this host (a stopped VM moves there); omitted: where it is",
    )


class Vm(_Model):
    id: str
    name: str
    state: str = Field(description="from libvirt: running, stopped, paused, ... or missing")
    phase: str = Field(description="creating, converting, ready or removing")
    memory_mib: int
    cpus: int
    domain_type: str
    disks: list[Disk]
    host: str = Field(default="local", description="the host its domain is defined on")
    last_start_seconds: float | None = Field(
        description="seconds the last start took, from request to a running domain"
    )
    pause_reason: str | None = Field(
        default=None,
        description="why a paused VM is paused, e.g. its source does not answer "
        "(the engine resumes it when it answers again)",
    )
    created_at: Timestamp


class VmStop(_Model):
    force: bool = False
    timeout: float | None = Field(default=None, gt=0, le=3600)


class Console(_Model):
    text: str
    offset: int = Field(description="pass as ?offset= to read on from here")


class ImportRequest(_Model):
    to: str = Field(min_length=1, description="name or id of the target storage domain")
    strategy: Literal["bulk", "mirror", "stream"] | None = Field(
        default=None,
        description="bulk (the default for an external disk): a fast copy of the "
        "source's data into the final volume, then a merge of the guest's writes; "
        "mirror: QEMU copies the whole chain (what a local disk's move does); "
        "stream: the same as bulk (block pull is not durable in QEMU)",
    )
    verify: Literal["digest", "full"] = Field(
        default="digest",
        description="digest: check the copy against digests of what was read from the "
        "source; full: also compare it with the source, read again",
    )
    bandwidth_mib: float | None = Field(
        default=None, gt=0, le=1024 * 1024, description="MiB/s limit"
    )


class JobEvent(_Model):
    at: Timestamp
    what: str | None = Field(
        description="the step begun or the state reached (failed: the error); "
        "None for a sample of the bytes done"
    )
    done: int | None = Field(default=None, description="bytes done then")


class Job(_Model):
    id: str
    kind: str
    vm_id: str | None
    state: str
    step: str
    params: dict[str, Any]
    progress: dict[str, Any]
    error: str | None
    created_at: Timestamp
    updated_at: Timestamp
    finished_at: Timestamp | None
    log: list[JobEvent] = Field(
        default_factory=list,
        description="steps and states with their times, and the bytes done every few "
        "seconds, oldest first; kept after the job ends",
    )


class Health(_Model):
    status: Literal["ok"]
    version: str
    libvirt_uri: str


class TokenCreate(_Model):
    name: Name
    read_only: bool = Field(default=False, description="may only read (GET), never change")


class Token(_Model):
    id: str
    name: str
    read_only: bool
    created_at: Timestamp
    revoked_at: Timestamp | None


class TokenCreated(Token):
    token: str = Field(description="the secret, shown this once; only its hash is stored")


class ExportCreate(_Model):
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="absolute path of an image file or device (or give vm and disk)",
        json_schema_extra=LOCAL_PATH,
    )
    vm: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="expose a point-in-time copy of this running VM's disk instead: the "
        "guest goes on writing to a new overlay, merged back when the export is removed",
    )
    disk: str | None = Field(
        default=None, pattern=r"^[a-z]{2,3}[a-z]$", description="the VM's disk (vda, ...)"
    )
    format: str | None = Field(default=None, description="raw, qcow2, ...; probed when omitted")
    name: Name | None = Field(
        default=None, description="the export's name (NBD export name, HTTP path)"
    )
    protocol: Literal["nbd", "http"] = "nbd"
    listen: str | None = Field(
        default=None,
        max_length=300,
        description="HOST:PORT, HOST or :PORT; 127.0.0.1 and a free port by default",
    )
    unix: str | None = Field(
        default=None,
        max_length=107,
        description="listen on this Unix socket instead (NBD only)",
        json_schema_extra=LOCAL_PATH,
    )
    tls: Literal["none", "psk", "x509"] | None = Field(
        default=None,
        description="omitted: psk for NBD on an address other than loopback (anyone who "
        "reaches the port could read a plain export), none on loopback, a Unix socket or HTTP",
    )
    tls_dir: str | None = Field(
        default=None,
        max_length=4096,
        description="use these credentials instead of making new ones: keys.psk for psk; "
        "ca-cert.pem, server-cert.pem, server-key.pem for x509",
        json_schema_extra=LOCAL_PATH,
    )
    shared: int = Field(default=16, ge=1, le=1024, description="clients served at once")


class Export(_Model):
    id: str
    name: str
    image: str
    format: str
    virtual_size: int
    protocol: Literal["nbd", "http"]
    url: str = Field(
        description="what a client opens; for TLS a libnbd URI naming the key or "
        "certificates it needs"
    )
    host: str | None
    port: int | None
    socket: str | None
    tls: Literal["none", "psk", "x509"]
    tls_username: str | None = Field(description="the PSK identity")
    psk_file: str | None = Field(description="the PSK key file a client needs (psktool format)")
    ca_cert: str | None = Field(description="the CA certificate that signed the server's")
    tls_certificates: str | None = Field(
        description="a directory with ca-cert.pem, client-cert.pem, client-key.pem "
        "(libnbd's tls-certificates=, QEMU's tls-creds-x509 dir)"
    )
    vm_id: str | None = Field(description="the VM whose disk this is a snapshot of")
    disk: str | None
    state: Literal["running", "stopped"] = Field(description="is its server process alive")
    phase: str = Field(description="creating, ready or removing")
    pid: int | None
    clients: int | None = Field(description="connections open now (from /proc/net)")
    bytes_read: int | None = Field(
        description="image bytes the server has read to answer clients since it started"
    )
    error: str | None = Field(description="why the server could not be started again")
    created_at: Timestamp
    engine: str | None = Field(
        default=None, description="the engine that runs its server (machine:THINAIR_HOME)"
    )
    warning: str | None = Field(
        default=None,
        description="set when the export is plain (no TLS) on an address beyond loopback",
    )


class HostCreate(_Model):
    name: Name
    libvirt_uri: str = Field(
        min_length=1,
        max_length=1024,
        description="qemu+ssh://, qemu+tls://, qemu+tcp:// or qemu:///system",
        json_schema_extra={"x-thinair-local": "libvirt"},
    )


class Host(_Model):
    name: str
    libvirt_uri: str
    # While the host cannot be reached (reachable false, see error): "" and 0.
    hypervisor: str
    hypervisor_version: str
    cpus: int
    memory_mib: int
    free_memory_mib: int = Field(description="what a new guest can have (free + page cache)")
    domain_type: str = Field(description="kvm, or qemu (TCG) where KVM cannot run guests")
    id: str | None = None
    local: bool = Field(default=True, description="the engine's own libvirt (THINAIR_LIBVIRT_URI)")
    reachable: bool = True
    error: str | None = Field(default=None, description="why libvirt there cannot be reached")
    vms: int = Field(default=0, description="VMs defined there")


class AuditEntry(_Model):
    id: int
    at: datetime
    token: str | None = Field(
        description="the name of the token that asked; None if none was valid"
    )
    client: str | None = Field(description="the client's address")
    method: str
    path: str
    action: str = Field(description="what was asked: create_vm, start_vm, revoke_token, ...")
    target: str | None = Field(description="what it was asked of: a name, id or image")
    status: int = Field(description="the HTTP status of the answer")
    outcome: Literal["ok", "refused", "failed"]
    message: str | None = Field(description="why, when refused or failed")
