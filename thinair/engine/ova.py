"""OVA: a VM from an Open Virtualization Appliance (a plain tar holding an OVF
descriptor and its disks), given by path or http(s) URL, with no disk unpacked.

The tar's index and the OVF are read here (for a URL, through a short-lived
nbdkit curl bridge and libnbd, with range reads only); each disk becomes an
external disk ``tar+...#ENTRY`` that QEMU reads through nbdkit's tar filter.
The OVF gives the name, memory, CPUs and the disks in the order of the VM's
disk drives.
"""

from __future__ import annotations

import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

from thinair.adapters import nbd_client
from thinair.engine import bridges, storage
from thinair.engine.context import EngineContext
from thinair.errors import ExternalDiskError, InvalidInput
from thinair.external import tar_url

OVF_LIMIT = 4 * 2**20  # bytes of OVF read at most
OPEN_TIMEOUT = 60.0  # seconds for the bridge to answer (it is local)
_UNITS = {"byte": 1, "kilobytes": 2**10, "megabytes": 2**20, "gigabytes": 2**30}


@dataclass(frozen=True)
class Appliance:
    name: str
    memory_mib: int | None
    cpus: int | None
    disks: list[str]  # tar+ URLs, in the order of the VM's disk drives


@contextmanager
def _open(ctx: EngineContext, source: str) -> Iterator[IO[bytes]]:
    if source.startswith("/"):
        storage.check_image_root(ctx, source, "OVA")
        try:
            with open(source, "rb") as f:
                yield f
        except OSError as e:
            raise ExternalDiskError(f"cannot read {source}: {e.strerror}") from e
        return
    with bridges.temporary(ctx, source) as url:
        try:
            reader = nbd_client.open_reader(url, OPEN_TIMEOUT)
        except nbd_client.NBDProbeError as e:
            raise ExternalDiskError(f"cannot read {source}: {e}") from e
        with reader:
            yield reader


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _attr(el: ET.Element, name: str) -> str | None:
    for key, value in el.attrib.items():
        if _local(key) == name:
            return value
    return None


def _child_text(el: ET.Element, name: str) -> str | None:
    for child in el:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return None


def _all(root: ET.Element, name: str) -> list[ET.Element]:
    return [el for el in root.iter() if _local(el.tag) == name]


def _units(text: str | None) -> int:
    """Bytes in one unit of an OVF AllocationUnits: 'byte * 2^20', 'MegaBytes'."""
    if not text:
        return 2**20
    text = text.replace(" ", "").lower()
    if m := re.fullmatch(r"byte\*2\^(\d+)", text):
        return int(2 ** int(m.group(1)))
    return _UNITS.get(text, 2**20)


def _name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:64]
    return name or "appliance"


def parse_ovf(text: bytes, members: set[str]) -> tuple[str, int | None, int | None, list[str]]:
    """(name, memory MiB, CPUs, tar entries of the disks in drive order)."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise InvalidInput(f"the OVF is not valid XML: {e}") from e
    files = {}
    for f in _all(root, "File"):
        href, compression = _attr(f, "href") or "", _attr(f, "compression")
        if compression and compression != "identity":
            raise InvalidInput(
                f"disk {href!r} is compressed ({compression}): thinair reads disks in "
                "place, so unpack it and make an OVA of the plain files"
            )
        files[_attr(f, "id") or ""] = href
    disks = {_attr(d, "diskId") or "": d for d in _all(root, "Disk")}
    memory = cpus = None
    drives: list[str] = []
    for item in _all(root, "Item") + _all(root, "StorageItem"):
        kind = _child_text(item, "ResourceType")
        quantity = _child_text(item, "VirtualQuantity")
        if kind == "3" and quantity:
            cpus = int(quantity)
        elif kind == "4" and quantity:
            memory = int(quantity) * _units(_child_text(item, "AllocationUnits")) // 2**20
        elif kind == "17":
            resource = _child_text(item, "HostResource") or ""
            drives.append(resource.rsplit("/", 1)[-1])
    order = drives or list(disks)
    entries = []
    for disk_id in order:
        disk = disks.get(disk_id)
        if disk is None:
            raise InvalidInput(f"the OVF's disk drive names disk {disk_id!r}, which it lacks")
        path = files.get(_attr(disk, "fileRef") or "")
        if not path:
            raise InvalidInput(f"the OVF's disk {disk_id!r} has no file (a blank disk)")
        if "://" in path or path.startswith("/") or ".." in path.split("/"):
            raise InvalidInput(f"the OVF's disk {disk_id!r} is at {path!r}, outside the OVA")
        if path not in members:
            raise InvalidInput(f"the OVA has no disk {path!r}, which its OVF names")
        entries.append(path)
    if not entries:
        raise InvalidInput("the OVF names no disk")
    system = next(iter(_all(root, "VirtualSystem")), None)
    name = "appliance"
    if system is not None:
        name = _name(_child_text(system, "Name") or _attr(system, "id") or name)
    return name, memory, cpus, entries


_EXTENT = re.compile(r'^\s*(?:RW|RDONLY|NOACCESS)\s+\d+\s+\w+\s+"([^"]+)"', re.M)


def _check_disk(tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    """A VMDK in an OVA must be one file (stream-optimized or monolithic sparse):
    a descriptor's extents would be looked for on this host, not in the tar."""
    f = tar.extractfile(member)
    head = f.read(4096) if f is not None else b""
    # A sparse VMDK (magic KDMV) embeds its descriptor, naming itself.
    if not head.startswith(b"KDMV") and b"createType" in head[:1024]:
        extents = _EXTENT.findall(head.decode(errors="replace"))
        inside = set(tar.getnames())
        outside = [e for e in extents if e not in inside]
        where = (
            f"extent {outside[0]!r} outside the tar"
            if outside
            else f"extents {', '.join(extents)} in separate files"
        )
        raise InvalidInput(
            f"disk {member.name!r} is a VMDK descriptor naming {where}: thinair runs OVA "
            "disks that are one file; convert it (qemu-img convert -O vmdk -o "
            "subformat=streamOptimized) and build the OVA again"
        )


def _read_ovf(
    tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], source: str
) -> tuple[str, int | None, int | None, list[str]]:
    ovfs = [m for name, m in members.items() if name.lower().endswith(".ovf")]
    if len(ovfs) != 1:
        raise InvalidInput(f"{source} holds {len(ovfs)} .ovf files, not one: not an OVA")
    if ovfs[0].size > OVF_LIMIT:
        raise InvalidInput(f"the OVF in {source} is larger than {OVF_LIMIT} bytes")
    handle = tar.extractfile(ovfs[0])
    assert handle is not None
    name, memory, cpus, entries = parse_ovf(handle.read(), set(members))
    for entry in entries:
        _check_disk(tar, members[entry])
    return name, memory, cpus, entries


def read(ctx: EngineContext, source: str) -> Appliance:
    """Read an OVA's index and OVF; check that every disk it names is in it."""
    ext = storage.check_location(ctx, source, "OVA")
    if ext.is_local:
        source = ext.url
    elif ext.scheme not in ("http", "https"):
        raise InvalidInput(f"an OVA is a local path or an http(s) URL, not {source!r}")
    with _open(ctx, source) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
                name, memory, cpus, entries = _read_ovf(tar, members, source)
        except (tarfile.TarError, EOFError) as e:
            raise InvalidInput(
                f"{source} is not a plain tar ({e}); an OVA is an uncompressed tar: "
                "compressed ones are not supported"
            ) from e
    return Appliance(
        name=name,
        memory_mib=memory,
        cpus=cpus,
        disks=[tar_url(source, entry) for entry in entries],
    )
