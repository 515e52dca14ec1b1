"""virt-v2v-in-place: convert a guest's disks, in place, to run on KVM/QEMU.

It gets a minimal libvirt XML (`-i libvirtxml`) naming the disks as the SATA
disks of a foreign hypervisor, so virt-v2v maps the guest's device names to
virtio ones, installs or enables the virtio drivers and rebuilds the boot
files. It runs libguestfs's appliance (a small QEMU VM) over the disks; every
line it prints (with -v -x: the appliance's log too) goes to a log file, and
its progress lines ("[  12.3] Inspecting the source") are passed on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from thinair.adapters import procfs
from thinair.adapters.errors import AdapterError

log = logging.getLogger(__name__)

TOOL = "virt-v2v-in-place"
# "[  36.3] Inspecting the source" (the appliance's kernel lines have 6 decimals)
STEP = re.compile(r"^\[\s*\d+\.\d\] (.+?)\s*$")
TAIL_LINES = 12


class ConversionFailed(AdapterError):
    """virt-v2v exited non-zero (or was stopped); `summary` is what it said."""

    def __init__(self, returncode: int | None, summary: str, log_path: Path) -> None:
        self.returncode = returncode
        self.summary = summary
        self.log_path = log_path
        super().__init__(summary, TOOL, summary)


@dataclass(frozen=True)
class Disk:
    path: str
    format: str


def available() -> bool:
    return shutil.which(TOOL) is not None


def source_xml(name: str, memory_mib: int, cpus: int, disks: Sequence[Disk]) -> str:
    dom = ET.Element("domain", type="kvm")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = str(cpus)
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type").text = "hvm"
    devices = ET.SubElement(dom, "devices")
    for index, d in enumerate(disks):
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type=d.format)
        ET.SubElement(disk, "source", file=d.path)
        ET.SubElement(disk, "target", dev="sd" + chr(ord("a") + index), bus="sata")
    return ET.tostring(dom, encoding="unicode")


def convert_in_place(
    name: str,
    memory_mib: int,
    cpus: int,
    disks: Sequence[Disk],
    log_path: Path,
    *,
    tcg: bool,
    on_step: Callable[[str], None] = lambda step: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Convert the guest on `disks` (written in place). Raises ConversionFailed
    with virt-v2v's own error lines (or the log's last lines) and keeps the log."""
    env = dict(os.environ, LIBGUESTFS_BACKEND="direct")
    if tcg:  # a KVM that cannot run the appliance's kernel (see FACTS.md)
        env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The XML sits next to the log: its path on virt-v2v's command line tells its
    # process apart (see stop_leftover).
    xml = xml_path(log_path)
    xml.write_text(source_xml(name, memory_mib, cpus, disks))
    # virt-v2v's scratch files; removed after, or by stop_leftover after a crash.
    tmp = scratch_path(log_path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    env["TMPDIR"] = str(tmp)
    argv = [TOOL, "-v", "-x", "-i", "libvirtxml", str(xml)]
    log.info("converting %s: %s (log %s)", name, " ".join(argv), log_path)
    # virt-v2v writes its log itself (not through a pipe to us), so an engine that
    # dies does not kill it half way; we follow the file for its progress lines.
    with open(log_path, "wb") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own group: a stop takes the appliance too
        )
    stopped = False
    pending = ""
    with open(log_path, encoding="utf-8", errors="replace") as follow:
        while True:
            ended = proc.poll() is not None
            *lines, pending = (pending + follow.read()).split("\n")
            for line in lines:
                match = STEP.match(line)
                if match:
                    on_step(match.group(1))
            if ended:
                break
            if not stopped and should_stop():
                stopped = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(0.5)
    returncode = proc.returncode
    shutil.rmtree(tmp, ignore_errors=True)
    xml.unlink(missing_ok=True)
    if stopped:
        raise ConversionFailed(None, "stopped", log_path)
    if returncode != 0:
        raise ConversionFailed(returncode, summary(log_path), log_path)


def xml_path(log_path: Path) -> Path:
    return log_path.with_suffix(".xml")


def scratch_path(log_path: Path) -> Path:
    return log_path.with_suffix(".tmp")


def stop_leftover(log_path: Path, timeout: float = 30) -> list[int]:
    """Kill a virt-v2v an earlier engine started for this log (it runs in its own
    session with its appliance and NBD server: the whole group goes), and wait
    for it to be gone. Returns the pids it killed."""
    xml = str(xml_path(log_path))
    found = list(procfs.find(frozenset({TOOL}), xml))
    for pid in found:
        log.warning("stopping virt-v2v %d left by an earlier engine", pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(not procfs.gone(pid) for pid in found) and time.monotonic() < deadline:
        time.sleep(0.2)
    shutil.rmtree(scratch_path(log_path), ignore_errors=True)
    return found


def summary(log_path: Path) -> str:
    """virt-v2v's error message (from "virt-v2v...: error:" to the end, without
    the hint to run it again with -v -x), else the log's last lines."""
    lines = log_path.read_text(errors="replace").splitlines()
    start = next(
        (i for i in range(len(lines) - 1, -1, -1) if re.match(r"^virt-v2v\S*: error:", lines[i])),
        None,
    )
    if start is None:
        picked = lines[-TAIL_LINES:]
    else:
        picked = []
        for line in lines[start:]:
            if line.startswith("If reporting bugs"):
                break
            picked.append(line)
    return "\n".join(line for line in picked if line.strip())[-4000:]
