"""What every flow needs: settings, the database, libvirt, per-VM locks and the
job runner (engine/build.py gives it the flows)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from thinair.adapters.virt import Virt
from thinair.config import Settings
from thinair.db.models import LOCAL_HOST_ID, Host, Installation, Vm, new_id
from thinair.db.session import Database
from thinair.engine.events import EventHub
from thinair.engine.jobs import JobRunner
from thinair.errors import Conflict

if TYPE_CHECKING:
    from thinair.engine.outages import OutageWatcher


class EngineContext:
    def __init__(self, settings: Settings, poll_interval: float = 5.0) -> None:
        self.settings = settings
        settings.home.mkdir(parents=True, exist_ok=True)
        settings.console_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.db_url)
        self.events = EventHub()
        self.virt = Virt(settings.libvirt_uri)  # the local host
        self.virt.on_lifecycle = self._on_lifecycle
        self._virts: dict[str, Virt] = {settings.libvirt_uri: self.virt}
        self._virts_lock = threading.Lock()
        self._domain_types: dict[str, str] = {}
        self._busy: dict[str, str] = {}
        self._busy_lock = threading.Lock()
        self._engine_id: str | None = None
        # Exports (engine/exports): one create or remove at a time, since names and
        # ports are chosen under it; and the VMs held busy by exports of their
        # disks, by export id.
        self.exports_lock = threading.Lock()
        self.exports_held: dict[str, ExitStack] = {}
        self.jobs = JobRunner(self, poll_interval)  # runs nothing until started
        self.outages: OutageWatcher | None = None  # set by the service that watches

    def _on_lifecycle(self, dom_uuid: str, name: str, state: str) -> None:
        """A domain changed state: an event for clients if it is one of our VMs
        (a VM's id is its domain's UUID)."""
        with self.db.session() as s:
            vm = s.get(Vm, dom_uuid)
            if vm is None or vm.name != name:
                return
        self.events.vm_changed(dom_uuid, name, state)
        if state == "paused" and self.outages is not None:
            self.outages.wake()  # an I/O error? it tells why, and resumes when it can

    def migrate(self) -> None:
        self.db.upgrade()
        _ = self.engine_id

    @property
    def engine_id(self) -> str:
        """The installation's identity, kept in the database and shared by every
        engine on it: the domains thinair defines carry it, so that two
        installations on one libvirtd never touch each other's domains, while the
        engines of one installation share theirs. An installation from before the
        database kept it adopts the one in THINAIR_HOME/engine-id; the file keeps a
        copy for tools that look there."""
        if self._engine_id is None:
            path = self.settings.home / "engine-id"
            try:
                with self.db.session() as s:
                    row = s.get(Installation, 1)
                    if row is None:
                        old = path.read_text().strip() if path.exists() else None
                        row = Installation(key=1, id=old or new_id())
                        s.add(row)
                    installation_id = row.id
            except IntegrityError:  # another engine wrote it first: take that one
                with self.db.session() as s:
                    installation_id = s.get_one(Installation, 1).id
            if not path.exists() or path.read_text().strip() != installation_id:
                path.write_text(installation_id + "\n")
            self._engine_id = installation_id
        return self._engine_id

    @property
    def engine_name(self) -> str:
        """This engine among those sharing a database: its machine and THINAIR_HOME.
        What runs as processes here (export servers) belongs to it alone."""
        return f"{socket.gethostname()}:{self.settings.home.resolve()}"

    @property
    def domain_type(self) -> str:
        return self.domain_type_on(self.virt)

    def domain_type_on(self, virt: Virt) -> str:
        if virt.uri not in self._domain_types:
            self._domain_types[virt.uri] = virt.choose_domain_type(self.settings.domain_type)
        return self._domain_types[virt.uri]

    def virt_at(self, uri: str | None) -> Virt:
        """The libvirt connection to a host (None: the local one), one per host."""
        uri = uri or self.settings.libvirt_uri
        with self._virts_lock:
            if uri not in self._virts:
                self._virts[uri] = Virt(uri)
            return self._virts[uri]

    def host_virt(self, host_id: str | None) -> Virt:
        """The libvirt connection to the host with this id (None: the local one)."""
        if host_id is None or host_id == LOCAL_HOST_ID:
            return self.virt
        with self.db.session() as s:
            host = s.get(Host, host_id)
            return self.virt_at(host.libvirt_uri if host else None)

    def vm_virt(self, name: str) -> Virt:
        """The libvirt connection to the host where the VM named `name` is defined."""
        with self.db.session() as s:
            host_id = s.scalar(select(Vm.host_id).where(Vm.name == name))
        return self.host_virt(host_id)

    @contextmanager
    def vm_busy(self, vm_id: str, what: str) -> Iterator[None]:
        """Hold a VM for one flow; a second flow on it, in this engine or in another
        on the same database, gets a clear conflict."""
        with self._busy_lock:
            if vm_id in self._busy:
                raise Conflict(f"the VM is busy: {self._busy[vm_id]} is in progress")
            if not self.db.locks.try_lock(f"vm:{vm_id}"):
                raise Conflict("the VM is busy: another engine is working on it")
            self._busy[vm_id] = what
        try:
            yield
        finally:
            with self._busy_lock:
                self._busy.pop(vm_id, None)
                self.db.locks.unlock(f"vm:{vm_id}")

    @contextmanager
    def vm_if_free(self, vm_id: str) -> Iterator[bool]:
        """Hold a VM if no flow (here or in another engine) holds it: says whether."""
        hold = ExitStack()
        try:
            hold.enter_context(self.vm_busy(vm_id, "reconcile"))
            free = True
        except Conflict:
            free = False
        with hold:
            yield free

    def close(self) -> None:
        for virt in self._virts.values():
            virt.close()
        self.db.dispose()
