"""Many VMs from one exported template: create them, start them, see them boot.
Shared by the provisioning test and bench/provision.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tests.support import guest
from thinair.client import Client


@dataclass
class Provisioned:
    names: list[str]
    began: float = 0.0  # time.monotonic() of the first create request
    created: float = 0.0  # seconds from the first create request to the last answer
    running: float = 0.0  # ... to the last VM started (libvirt says running)
    # ... to the last guest's first console output: its kernel and initramfs were
    # read through the export (syslinux loads them from the disk).
    started: float | None = None
    start_times: dict[str, float] = field(default_factory=dict)
    booted: dict[str, float] = field(default_factory=dict)  # boot markers seen by then


def _each(workers: int, action: Callable[[str], object], names: Iterable[str]) -> None:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(action, names):  # re-raises the first failure
            pass


def provision(
    client_of: Callable[[], Client],
    url: str,
    names: list[str],
    memory_mib: int = 64,
    workers: int = 8,
    storage: str | None = None,
) -> Provisioned:
    """Create and start one VM per name, each on its own overlay over `url`,
    from `workers` threads (each with its own SDK client)."""
    disk = f"{url},format=raw" + (f",storage={storage}" if storage else "")
    clients: dict[int, Client] = {}

    def client() -> Client:
        key = threading.get_ident()
        if key not in clients:
            clients[key] = client_of()
        return clients[key]

    result = Provisioned(names, began=time.monotonic())
    began = result.began
    _each(workers, lambda n: client().vms.create(n, [disk], memory_mib=memory_mib), names)
    result.created = time.monotonic() - began
    _each(workers, lambda n: client().vms.start(n), names)
    result.running = time.monotonic() - began
    for c in clients.values():
        c.close()
    return result


def wait_kernels(c: Client, result: Provisioned, timeout: float = 1200) -> None:
    """Wait until every guest printed something on its console: its boot loader
    read the kernel and initramfs from the disk, through the export.

    Not its boot marker: with 50 guests under TCG on a two-core machine, a starved
    guest kernel can panic in its timer check ("IO-APIC + timer doesn't work"),
    which says nothing about the disk. Guest errors about the disk fail."""
    began = result.began
    offsets = dict.fromkeys(result.names, 0)
    texts = dict.fromkeys(result.names, "")
    deadline = time.monotonic() + timeout
    while len(result.start_times) < len(result.names):
        for name in result.names:
            if name in result.start_times:
                continue
            part = c.vms.console(name, offset=offsets[name])
            offsets[name], texts[name] = part.offset, texts[name] + part.text
            if texts[name].strip():
                result.start_times[name] = time.monotonic() - began
        if time.monotonic() > deadline:
            missing = sorted(set(result.names) - set(result.start_times))
            raise AssertionError(f"{len(missing)} guests printed nothing in {timeout} s: {missing}")
        time.sleep(1)
    result.started = max(result.start_times.values())
    for name in result.names:
        info = guest.parse_console(texts[name])
        if info["errors"]:
            raise AssertionError(f"{name}: guest reported {info['errors']}")
        if info["boot_ok"]:
            result.booted[name] = result.start_times[name]
