"""Shared pieces of the benchmarks (not a benchmark itself).

- Row: one figure of the results table, with its reference measured in the same
  run, the ratio value/reference, a target and whether it was met.
- Lab: a scratch directory QEMU can reach, an engine with storage domains `tmp`
  and `final`, qemu-nbd exports; everything is removed on exit, also on failure.
- ConsoleWatch: follows a VM's console log file (written by virtlogd) from a
  thread and stamps each THINAIR- line with the time it arrived.
- bench_main: the command line every benchmark has (`--quick`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402
import libvirt_qemu  # noqa: E402

from tests.support import guest  # noqa: E402
from tests.support.engine import Engine  # noqa: E402
from thinair.adapters import qemu_nbd  # noqa: E402
from thinair.adapters.virt import Virt  # noqa: E402
from thinair.client import Client  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "history.jsonl"
WORK_ROOT = Path("/var/tmp/thinair-bench")
LIBVIRT_LOGS = Path("/var/log/libvirt/qemu")
KiB = 2**10
MiB = 2**20
GiB = 2**30


# The guest's first disk (libvirt's vda) as QEMU's qemu-io command names it.
DRIVE = "/machine/peripheral/virtio-disk0/virtio-backend"


def read_seconds(dom: libvirt.virDomain, offset: int, length: int) -> float:
    """Time one read of `length` bytes through the guest's drive, inside its QEMU."""
    command = f'qemu-io -d {DRIVE} "read {offset} {length}"'
    began = time.monotonic()
    out = libvirt_qemu.qemuMonitorCommand(
        dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    )
    took = time.monotonic() - began
    if out.strip():  # qemu-io prints to QEMU's log; the monitor only gets errors
        raise RuntimeError(f"{command}: {out.strip()}")
    return took


@dataclass
class Row:
    """One line of the table. `ratio` is value / reference."""

    figure: str
    value: float
    unit: str
    reference: float | None = None
    target: str = ""
    met: bool | None = None
    detail: dict[str, object] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.reference is None or self.reference == 0:
            return None
        return self.value / self.reference

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "ratio": self.ratio}


def _num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    text = f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return f"{text} {unit}".rstrip()


def print_table(rows: Sequence[Row]) -> None:
    width = max([len(r.figure) for r in rows] + [6])
    head = f"{'figure':{width}}  {'value':>11}  {'reference':>11}  {'ratio':>6}  target         met"
    lines = [head, "-" * len(head)]
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        lines.append(
            f"{r.figure:{width}}  {_num(r.value, r.unit):>11}  "
            f"{_num(r.reference, r.unit):>11}  {_num(r.ratio):>6}  {r.target or '-':14} {met}"
        )
    print("\n".join(lines), flush=True)


def append_history(bench: str, rows: Sequence[Row], **extra: object) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    line = {"bench": bench, "time": time.time(), **extra, "rows": [r.as_json() for r in rows]}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(line) + "\n")


def log(*parts: object) -> None:
    """Progress, on stderr so that stdout holds the table."""
    print(*parts, file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def bench_main(name: str, run: Callable[[bool], list[Row]], doc: str | None) -> None:
    """The CLI of one benchmark: run it, print its table, append it to the history."""
    parser = argparse.ArgumentParser(description=(doc or name).split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller")
    args = parser.parse_args()
    rows = run(args.quick)
    print_table(rows)
    append_history(name, rows, quick=args.quick)


def write_image(path: Path, size: int, data: Sequence[tuple[int, int]] = ()) -> None:
    """A sparse raw file of `size` bytes with random data at each (offset, length)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in data:
            f.seek(offset)
            for done in range(0, length, 4 * MiB):
                f.write(os.urandom(min(4 * MiB, length - done)))
    os.chmod(path, 0o644)


def guest_image() -> Path:
    """The test guest (scripts/build-guest-image.sh builds it once, cached)."""
    image = guest.default_image()
    if not image.exists():
        done = subprocess.run(
            [str(ROOT / "scripts" / "build-guest-image.sh")],
            check=True,
            capture_output=True,
            text=True,
        )
        image = Path(done.stdout.strip().splitlines()[-1])
    return image


class Lab:
    """Everything one benchmark creates, removed on exit whatever happened."""

    def __init__(self, label: str, libvirt_uri: str = "qemu:///system") -> None:
        self.label = label
        self.run_id = uuid.uuid4().hex[:6]
        self.dir = WORK_ROOT / f"{label}-{self.run_id}"
        self.engine = Engine(home=self.dir / "home", libvirt_uri=libvirt_uri)
        self.exports: list[qemu_nbd.Server] = []
        self.names: list[str] = []

    def __enter__(self) -> Lab:
        WORK_ROOT.mkdir(mode=0o755, exist_ok=True)
        os.chmod(WORK_ROOT, 0o755)
        self.dir.mkdir(mode=0o755)
        try:
            for sd in ("tmp", "final"):
                (self.dir / sd).mkdir(mode=0o755)
            self.engine.start()
            c = self.client()
            for sd in ("tmp", "final"):
                c.storage_domains.add(sd, str(self.dir / sd))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        if t is not None and t is not KeyboardInterrupt:
            log(f"{self.label}: failed; engine log tail:\n{self.engine.log()[-3000:]}")
        self.close()

    def client(self) -> Client:
        return self.engine.client()

    def path(self, name: str) -> Path:
        return self.dir / name

    def vm_name(self, what: str) -> str:
        # THINAIR_BENCH_PREFIX: to tell one person's VMs from another's on a shared host
        prefix = os.environ.get("THINAIR_BENCH_PREFIX", "bench")
        name = f"{prefix}-{self.label}-{what}-{self.run_id}"
        self.names.append(name)
        return name

    def export(self, image: Path, shared: int = 8) -> qemu_nbd.Server:
        """Serve `image` read-only with qemu-nbd, as another host would."""
        server = qemu_nbd.Server(str(image), export_name="disk", shared=shared)
        server.start()
        self.exports.append(server)
        return server

    def unexport(self, server: qemu_nbd.Server) -> None:
        server.stop()
        self.exports.remove(server)

    def console_log(self, vm_id: str) -> Path:
        return self.engine.settings.console_dir / f"{vm_id}.log"

    def remove_vm(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.client().vms.remove(name, force=True)

    def close(self) -> None:
        if self.engine.proc is not None and self.engine.libvirt_uri.startswith("qemu"):
            with contextlib.suppress(Exception):
                c = self.client()
                for vm in c.vms.list():
                    self.remove_vm(vm.id)
                for export in c.exports.list():  # their servers outlive the engine
                    c.exports.remove(export.id)
        self.engine.stop()
        self._sweep_domains()
        self._stop_bridges()
        for server in self.exports:
            server.stop()
        self.exports.clear()
        for name in self.names:  # libvirt keeps a log per domain name
            with contextlib.suppress(FileNotFoundError):
                (LIBVIRT_LOGS / f"{name}.log").unlink()
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            WORK_ROOT.rmdir()  # only if no other run uses it

    def _stop_bridges(self) -> None:
        """Any nbdkit bridge the engine left under this lab (they outlive it)."""
        for pid_file in (self.engine.home / "bridges").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if str(self.dir).encode() in cmdline:
                    os.kill(pid, signal.SIGTERM)

    def _sweep_domains(self) -> None:
        """Any domain this engine defined and did not remove (a failed step)."""
        id_file = self.engine.home / "engine-id"
        if not self.engine.libvirt_uri.startswith("qemu") or not id_file.exists():
            return
        engine_id = id_file.read_text().strip()
        try:
            conn = libvirt.open(self.engine.libvirt_uri)
        except libvirt.libvirtError:
            return
        try:
            for dom in conn.listAllDomains():
                owner = Virt.owner(dom)
                if owner and owner[0] == engine_id:
                    with contextlib.suppress(libvirt.libvirtError):
                        if dom.isActive():
                            dom.destroy()
                        dom.undefine()
        finally:
            conn.close()


class ConsoleWatch:
    """Follows a console log file from a thread, every `period` seconds, and keeps
    (arrival time, line) for each line holding a THINAIR- marker. Times are
    time.monotonic(). The file may not exist yet, or be truncated by a start."""

    def __init__(self, path: Path, period: float = 0.005) -> None:
        self.path = path
        self.period = period
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="console", daemon=True)

    def __enter__(self) -> ConsoleWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _follow(self) -> None:
        offset, partial = 0, b""
        while not self._stop.is_set():
            try:
                with open(self.path, "rb") as f:
                    if os.fstat(f.fileno()).st_size < offset:
                        offset, partial = 0, b""
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            now = time.monotonic()
            if data:
                offset += len(data)
                *complete, partial = (partial + data).split(b"\n")
                found = []
                for raw in complete:
                    text = raw.decode(errors="replace")
                    at = text.find("THINAIR-")
                    if at >= 0:
                        found.append((now, text[at:].strip()))
                if found:
                    with self._cond:
                        self.lines.extend(found)
                        self._cond.notify_all()
            self._stop.wait(self.period)

    def times(self, marker: str) -> list[float]:
        with self._cond:
            return [t for t, line in self.lines if line.startswith(marker)]

    def wait(self, marker: str, count: int = 1, timeout: float = 180) -> float:
        """Wait until `count` lines with `marker` arrived; the last one's time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                errors = [line for _, line in self.lines if line.startswith(guest.MARK_ERROR)]
                if errors:
                    raise RuntimeError(f"guest reported {errors}")
                seen = [t for t, line in self.lines if line.startswith(marker)]
                if len(seen) >= count:
                    return seen[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.path}: no {count} x {marker} in {timeout} s")
                self._cond.wait(remaining)


@contextlib.contextmanager
def timer() -> Iterator[Callable[[], float]]:
    """with timer() as took: ...; took() is the seconds the block took."""
    began = time.monotonic()
    ended: list[float] = []
    yield lambda: (ended[0] if ended else time.monotonic()) - began
    ended.append(time.monotonic())
