"""`thinair vm console NAME --attach`: the guest's serial console, live, on a
terminal (virsh console against the VM's host), left with Ctrl+] while the
guest keeps running."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

import pytest

from tests.conftest import Engine
from tests.support import guest
from tests.unit.test_cli import on_terminal
from thinair.adapters import qemu_nbd

pytestmark = pytest.mark.guest


def test_attach_then_leave(
    engine: Engine, guest_export: qemu_nbd.Server, storage_dir: Path
) -> None:
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    c.vms.create("i18-attach", disks=[guest_export.url], memory_mib=256)
    stopped = on_terminal(engine, "vm", "console", "i18-attach", "--attach")
    assert stopped[0] == 1 and "is stopped: start it first" in stopped[1]
    c.vms.start("i18-attach")

    def until_written(leader: int, shown: bytearray) -> None:
        deadline = time.monotonic() + 120
        while guest.MARK_WROTE.encode() not in shown:
            assert time.monotonic() < deadline, shown.decode(errors="replace")[-2000:]
            if select.select([leader], [], [], 0.5)[0]:
                shown += os.read(leader, 65536)
        os.write(leader, b"\x1d")  # Ctrl+]: leave, as virsh console

    status, shown = on_terminal(
        engine, "vm", "console", "i18-attach", "--attach", interact=until_written
    )
    assert "leave with Ctrl+]" in shown and guest.MARK_WROTE in shown
    assert status == 0, shown[-2000:]
    assert c.vms.get("i18-attach").state == "running"  # leaving does not stop it
    c.vms.rollback("i18-attach")
