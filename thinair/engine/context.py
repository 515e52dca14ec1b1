"""What every flow needs: settings, the database, libvirt, and per-VM locks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from thinair.adapters.virt import Virt
from thinair.config import Settings
from thinair.db.models import Vm, new_id
from thinair.db.session import Database
from thinair.engine.events import EventHub
from thinair.errors import Conflict

if TYPE_CHECKING:
    from thinair.engine.jobs import JobRunner


class EngineContext:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.home.mkdir(parents=True, exist_ok=True)
        settings.console_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.db_url)
        self.events = EventHub()
        self.virt = Virt(settings.libvirt_uri)
        self.virt.on_lifecycle = self._on_lifecycle
        self._busy: dict[str, str] = {}
        self._busy_lock = threading.Lock()
        self._engine_id: str | None = None
        self._domain_type: str | None = None
        self.jobs: JobRunner | None = None  # set by the service that runs jobs

    def _on_lifecycle(self, dom_uuid: str, name: str, state: str) -> None:
        """A domain changed state: an event for clients if it is one of our VMs
        (a VM's id is its domain's UUID)."""
        with self.db.session() as s:
            vm = s.get(Vm, dom_uuid)
            if vm is None or vm.name != name:
                return
        self.events.vm_changed(dom_uuid, name, state)

    def migrate(self) -> None:
        self.db.upgrade()

    @property
    def engine_id(self) -> str:
        """This engine's identity, kept in THINAIR_HOME: its domains carry it so that
        two engines on one libvirtd never touch each other's domains."""
        if self._engine_id is None:
            path = self.settings.home / "engine-id"
            if not path.exists():
                path.write_text(new_id() + "\n")
            self._engine_id = path.read_text().strip()
        return self._engine_id

    @property
    def domain_type(self) -> str:
        if self._domain_type is None:
            self._domain_type = self.virt.choose_domain_type(self.settings.domain_type)
        return self._domain_type

    @contextmanager
    def vm_busy(self, vm_id: str, what: str) -> Iterator[None]:
        """Hold a VM for one flow; a second flow on it gets a clear conflict."""
        with self._busy_lock:
            if vm_id in self._busy:
                raise Conflict(f"the VM is busy: {self._busy[vm_id]} is in progress")
            self._busy[vm_id] = what
        try:
            yield
        finally:
            with self._busy_lock:
                self._busy.pop(vm_id, None)

    def close(self) -> None:
        self.virt.close()
        self.db.dispose()
