"""What the engine knows, one table per concept. Every resource thinair creates
(volume, domain, export, token) is owned by a row here."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar, overload

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from thinair.states import ExportPhase, JobState, VmPhase

E = TypeVar("E", bound=StrEnum)


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def aware(dt: datetime) -> datetime: ...
@overload
def aware(dt: None) -> None: ...
def aware(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every time thinair stores is UTC."""
    return dt.replace(tzinfo=UTC) if dt is not None and dt.tzinfo is None else dt


class Base(DeclarativeBase):
    pass


class Enumerated(TypeDecorator[E]):
    """A StrEnum in a plain string column: the column holds the value (the string
    it always held), a read gives the enum, and a write of anything else fails."""

    impl = String
    cache_ok = True

    def __init__(self, enum: type[E], length: int) -> None:
        super().__init__(length)
        self.enum = enum

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else self.enum(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> E | None:
        return None if value is None else self.enum(value)


# The host the engine runs next to, there from the start: its libvirt URI is the
# engine's own setting (THINAIR_LIBVIRT_URI), so it is not stored.
LOCAL_HOST_ID = "00000000-0000-0000-0000-000000000001"
LOCAL_HOST = "local"


class Installation(Base):
    """One row: the identity of this thinair installation (every engine on one
    database shares it). The domains thinair defines carry it, so that thinair
    never touches a domain it did not define, and every engine of the
    installation can manage the domains of the others."""

    __tablename__ = "installation"

    key: Mapped[int] = mapped_column(Integer, primary_key=True, default=1)  # always 1
    id: Mapped[str] = mapped_column(String(36), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Host(Base):
    """A libvirt host VMs run on."""

    __tablename__ = "hosts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    # None for the local host: the engine's THINAIR_LIBVIRT_URI.
    libvirt_uri: Mapped[str | None] = mapped_column(Text, unique=True, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StorageDomain(Base):
    __tablename__ = "storage_domains"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    # The one host that reaches it, or None: shared (mounted at `path` on every
    # host and on the engine's machine, such as NFS).
    host_id: Mapped[str | None] = mapped_column(ForeignKey("hosts.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    host: Mapped[Host | None] = relationship()


class Vm(Base):
    __tablename__ = "vms"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    memory_mib: Mapped[int] = mapped_column(Integer)
    cpus: Mapped[int] = mapped_column(Integer)
    # creating -> ready -> removing, or creating -> converting (virt-v2v runs over
    # its overlays in a convert job) -> ready -> removing; a crash leaves the phase
    # that tells the reconciler what to finish or undo (states.TRANSITIONS).
    phase: Mapped[VmPhase] = mapped_column(Enumerated(VmPhase, 16), default=VmPhase.CREATING)
    domain_type: Mapped[str] = mapped_column(String(8))
    console_log: Mapped[str] = mapped_column(Text)
    last_start_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Where its domain is defined.
    host_id: Mapped[str] = mapped_column(
        ForeignKey("hosts.id"), default=LOCAL_HOST_ID, server_default=LOCAL_HOST_ID
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    host: Mapped[Host] = relationship()
    disks: Mapped[list[Disk]] = relationship(
        back_populates="vm", order_by="Disk.position", cascade="all, delete-orphan"
    )


class Disk(Base):
    __tablename__ = "disks"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    target: Mapped[str] = mapped_column(String(8))
    storage_domain_id: Mapped[str] = mapped_column(ForeignKey("storage_domains.id"))
    # The volume thinair owns: the temporary overlay while the disk is external,
    # the final local volume after an import.
    volume_path: Mapped[str] = mapped_column(Text)
    volume_format: Mapped[str] = mapped_column(String(16), default="qcow2")
    virtual_size: Mapped[int] = mapped_column(BigInteger)
    # The external disk (never written). None once the disk is local.
    external_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    external_format: Mapped[str | None] = mapped_column(String(16), nullable=True)
    external_read_only: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    # Made empty with the VM (local from the start): part of what the VM created,
    # so rollback deletes it; an imported disk (local, not blank) blocks rollback.
    blank: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    vm: Mapped[Vm] = relationship(back_populates="disks")
    storage_domain: Mapped[StorageDomain] = relationship()

    @property
    def location(self) -> str:
        return "external" if self.external_url else "local"


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(32))
    vm_id: Mapped[str | None] = mapped_column(
        ForeignKey("vms.id", ondelete="SET NULL"), nullable=True
    )
    # pending -> running -> succeeded | failed | cancelled (states.TRANSITIONS)
    state: Mapped[JobState] = mapped_column(Enumerated(JobState, 16), default=JobState.PENDING)
    step: Mapped[str] = mapped_column(Text, default="")
    # The flow's typed parameters (engine/job_params.py), as JSON; an update
    # merges keys into them.
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Asked for by a user (or a rollback) while the job runs; the flow looks at it
    # between steps. A column of its own: no update of the params can erase it.
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # What happened when: {"at": ISO time, "what": step or state (None for a
    # sample of the bytes done), "done": bytes done then}; see engine/jobs.py.
    log: Mapped[list[dict[str, Any]]] = mapped_column(
        JSON, default=list, server_default=text("'[]'")
    )


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    read_only: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Export(Base):
    """A read-only NBD or HTTP server thinair runs for an image. The server
    process outlives the engine; this row owns it (pid) and its directory
    THINAIR_HOME/exports/ID (TLS keys, pid file, log, nginx configuration)."""

    __tablename__ = "exports"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    image: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(16))
    virtual_size: Mapped[int] = mapped_column(BigInteger)
    protocol: Mapped[str] = mapped_column(String(8), default="nbd")
    # TCP (host, port) or a Unix socket: kept so a restart serves the same URL.
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    socket: Mapped[str | None] = mapped_column(Text, nullable=True)
    tls: Mapped[str] = mapped_column(String(8), default="none")
    # Credentials the user brought (a directory thinair reads, never owns or
    # deletes); None when thinair made them in the export's directory.
    tls_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    shared: Mapped[int] = mapped_column(Integer, default=16)
    # A point-in-time copy of a running VM's disk: the disk's volume (image) was
    # frozen by an external snapshot; the guest writes to snapshot_path until
    # the export is removed and that overlay is committed back.
    vm_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    disk: Mapped[str | None] = mapped_column(String(8), nullable=True)
    snapshot_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    # creating -> ready -> removing, as for VMs: what the reconciler finishes or undoes.
    phase: Mapped[ExportPhase] = mapped_column(
        Enumerated(ExportPhase, 16), default=ExportPhase.CREATING
    )
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Why the server could not be started again after an engine restart.
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The engine whose machine runs the server (EngineContext.engine_name); None
    # from before engines shared a database: the one engine's.
    engine: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEntry(Base):
    """One request that asked for a change (or was refused one): who (the
    token's name, the client's address), what (the action and its target),
    when, and how it ended. Written by thinair.api.audit, never changed."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    client: Mapped[str | None] = mapped_column(String(64), nullable=True)
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(512), nullable=True)
    status: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16))  # ok, refused, failed
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
