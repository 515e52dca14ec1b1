"""Layout and console protocol of thinair's test guest image.

The image is built by scripts/build-guest-image.sh (keep the constants here in step with
it). Its guest prints markers on the serial console (ttyS0) and appends numbered
records to its own disk; this module parses that console output, decodes the records
through any ``read(offset, length)`` callable (a raw file, an NBD export, a qcow2 chain
read through qemu-img or libnbd) and knows the deterministic pattern region.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TypedDict

MIB: int = 1024 * 1024

# Image layout (byte offsets into the raw disk).
IMAGE_SIZE: int = 256 * MIB
FAT_OFFSET: int = 0
FAT_SIZE: int = 64 * MIB
HEADER_OFFSET: int = 64 * MIB
HEADER_SIZE: int = 512
SLOTS_OFFSET: int = 64 * MIB + 4096
SLOTS_END: int = 96 * MIB
SLOT_SIZE: int = 512
SLOT_COUNT: int = (SLOTS_END - SLOTS_OFFSET) // SLOT_SIZE  # 65528
PATTERN_OFFSET: int = 96 * MIB
PATTERN_SIZE: int = 64 * MIB
PATTERN_SEED: bytes = b"thinair-guest-pattern-v1"  # pattern = SHAKE-256(seed), 64 MiB
ZERO_OFFSET: int = 160 * MIB  # [ZERO_OFFSET, IMAGE_SIZE) is all zeros
HEAD_MD5_SIZE: int = 1 * MIB  # THINAIR-DISK head_md5 covers this many leading bytes

# On-disk formats.
HEADER_PREFIX: bytes = b"THINAIR-HDR next="
RECORD_PREFIX: bytes = b"THINAIR-REC "

# Console markers, each printed at the start of its own line.
MARK_BOOT_OK: str = "THINAIR-BOOT-OK"  # uptime=<seconds>
MARK_DISK: str = "THINAIR-DISK"  # name=vdX size=<bytes> head_md5=<md5>
MARK_PATTERN: str = "THINAIR-PATTERN"  # md5=<md5 of vda's pattern region>
MARK_WROTE: str = "THINAIR-WROTE"  # seq=<N>, printed once record and header are fsync'd
MARK_FULL: str = "THINAIR-FULL"  # next=<N>, the slot region is full; the guest idles
MARK_POWEROFF: str = "THINAIR-POWEROFF"  # power button seen, powering off now
MARK_ERROR: str = "THINAIR-ERROR"  # <free text>

# Kernel command line knob: milliseconds between two records (0: no pause).
INTERVAL_ARG: str = "thinair.interval"
DEFAULT_INTERVAL_MS: int = 1000

IMAGE_NAME: str = "guest-v1.raw"
DEFAULT_CACHE: str = "/var/cache/thinair"


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The build cache: ``${THINAIR_CACHE:-/var/cache/thinair}``, as in the script."""
    env = os.environ if environ is None else environ
    return Path(env.get("THINAIR_CACHE") or DEFAULT_CACHE)


def default_image(environ: Mapping[str, str] | None = None) -> Path:
    """Where scripts/build-guest-image.sh puts the image when given no OUT argument."""
    return cache_dir(environ) / IMAGE_NAME


DEFAULT_IMAGE: Path = default_image()


class CorruptRecordError(ValueError):
    """The header or a committed record slot does not hold what the guest writes."""


@dataclass(frozen=True)
class Record:
    """One record: ``seq`` is its slot; ``boot`` is the seq of its boot's first record."""

    seq: int
    boot: int
    md5: str


def record_body(seq: int, boot: int) -> str:
    """The string whose md5 a record carries."""
    return f"seq={seq} boot={boot}"


def record_block(seq: int, boot: int) -> bytes:
    """The 512-byte slot content the guest writes for a record."""
    body = record_body(seq, boot)
    md5 = hashlib.md5(body.encode()).hexdigest()
    return f"THINAIR-REC {body} md5={md5}\n".encode().ljust(SLOT_SIZE, b"\0")


def header_block(next_seq: int) -> bytes:
    """The 512-byte header the guest writes after record ``next_seq - 1``."""
    return HEADER_PREFIX + str(next_seq).encode().ljust(HEADER_SIZE - len(HEADER_PREFIX), b"\0")


def slot_offset(seq: int) -> int:
    """Byte offset of record slot ``seq``."""
    if not 0 <= seq < SLOT_COUNT:
        raise ValueError(f"slot {seq} out of range 0..{SLOT_COUNT - 1}")
    return SLOTS_OFFSET + seq * SLOT_SIZE


_HEADER_RE = re.compile(rb"THINAIR-HDR next=([0-9]+)\0*")
_RECORD_RE = re.compile(rb"THINAIR-REC seq=([0-9]+) boot=([0-9]+) md5=([0-9a-f]{32})\n\0*")


def _shown(block: bytes) -> str:
    return repr(block.rstrip(b"\0")[:80])


def parse_header(block: bytes) -> int:
    """Next seq from a header block: 0 if all zeros; raises on anything else unexpected."""
    if len(block) != HEADER_SIZE:
        raise CorruptRecordError(f"header: read {len(block)} bytes, expected {HEADER_SIZE}")
    if block.count(0) == HEADER_SIZE:
        return 0
    m = _HEADER_RE.fullmatch(block)
    if m is None:
        raise CorruptRecordError(f"header: unexpected content {_shown(block)}")
    next_seq = int(m.group(1))
    if next_seq > SLOT_COUNT:
        raise CorruptRecordError(f"header: next={next_seq} beyond {SLOT_COUNT} slots")
    return next_seq


def parse_record(block: bytes, seq: int) -> Record:
    """Decode and check the slot ``seq``; raises CorruptRecordError if it is not valid."""
    m = _RECORD_RE.fullmatch(block) if len(block) == SLOT_SIZE else None
    if m is None:
        raise CorruptRecordError(f"slot {seq}: unexpected content {_shown(block)}")
    rec = Record(seq=int(m.group(1)), boot=int(m.group(2)), md5=m.group(3).decode())
    if rec.seq != seq:
        raise CorruptRecordError(f"slot {seq}: holds seq={rec.seq}")
    if rec.boot > rec.seq:
        raise CorruptRecordError(f"slot {seq}: boot={rec.boot} after its own seq")
    expected = hashlib.md5(record_body(rec.seq, rec.boot).encode()).hexdigest()
    if rec.md5 != expected:
        raise CorruptRecordError(f"slot {seq}: md5={rec.md5}, expected {expected}")
    return rec


def decode_records(read: Callable[[int, int], bytes]) -> list[Record]:
    """Read the header, then every committed record (slots 0..next-1), and check them.

    ``read(offset, length)`` returns ``length`` bytes of the disk at ``offset``. Slots at
    or past the header's ``next`` are not read: the guest may have written one there
    before it was stopped, without committing it in the header.
    """
    next_seq = parse_header(read(HEADER_OFFSET, HEADER_SIZE))
    records: list[Record] = []
    chunk_slots = 4096  # 2 MiB per read
    for first in range(0, next_seq, chunk_slots):
        count = min(chunk_slots, next_seq - first)
        data = read(slot_offset(first), count * SLOT_SIZE)
        if len(data) != count * SLOT_SIZE:
            raise CorruptRecordError(f"slots {first}..: read {len(data)} bytes")
        for i in range(count):
            records.append(parse_record(data[i * SLOT_SIZE : (i + 1) * SLOT_SIZE], first + i))
    for prev, rec in pairwise(records):
        if rec.boot < prev.boot or (rec.boot != prev.boot and rec.boot != rec.seq):
            raise CorruptRecordError(f"slot {rec.seq}: boot={rec.boot} after boot={prev.boot}")
    return records


def file_reader(path: str | os.PathLike[str]) -> Callable[[int, int], bytes]:
    """A ``read(offset, length)`` over a raw image file, for decode_records."""

    def read(offset: int, length: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    return read


def expected_pattern() -> bytes:
    """The pattern region's bytes, as the build script makes them."""
    return hashlib.shake_256(PATTERN_SEED).digest(PATTERN_SIZE)


def expected_pattern_md5() -> str:
    """md5 of expected_pattern(): what a guest booted from a good image prints."""
    return hashlib.md5(expected_pattern()).hexdigest()


def pattern_md5(path: str | os.PathLike[str]) -> str:
    """md5 of bytes [PATTERN_OFFSET, PATTERN_OFFSET + PATTERN_SIZE) of a raw image file."""
    h = hashlib.md5()
    remaining = PATTERN_SIZE
    with open(path, "rb") as f:
        f.seek(PATTERN_OFFSET)
        while remaining:
            data = f.read(min(remaining, 4 * MIB))
            if not data:
                raise ValueError(f"{path}: ends inside the pattern region")
            h.update(data)
            remaining -= len(data)
    return h.hexdigest()


class DiskInfo(TypedDict):
    """One THINAIR-DISK line."""

    name: str
    size: int
    head_md5: str


class ConsoleInfo(TypedDict):
    """What parse_console found. With several boots in one log, the last boot's values."""

    boot_ok: bool
    boot_count: int
    uptime: float | None
    disks: list[DiskInfo]
    pattern_md5: str | None
    wrote: list[int]
    full: bool
    poweroff: bool
    errors: list[str]


# Terminal control sequences (SeaBIOS resets the terminal without a newline).
_ESCAPE_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-~])")
_BOOT_RE = re.compile(r"THINAIR-BOOT-OK uptime=([0-9]+(?:\.[0-9]+)?)")
_DISK_RE = re.compile(r"THINAIR-DISK name=(vd[a-z]+) size=([0-9]+) head_md5=([0-9a-f]{32})")
_PATTERN_RE = re.compile(r"THINAIR-PATTERN md5=([0-9a-f]{32})")
_WROTE_RE = re.compile(r"THINAIR-WROTE seq=([0-9]+)")
_ERROR_RE = re.compile(r"THINAIR-ERROR ?(.*)")


def parse_console(text: str | bytes) -> ConsoleInfo:
    """Parse the guest's serial console output (partial output is fine).

    ``wrote`` lists every seq the guest reported as written and fsync'd, over all boots
    in the log; disks and pattern_md5 are those of the last boot.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    info: ConsoleInfo = {
        "boot_ok": False,
        "boot_count": 0,
        "uptime": None,
        "disks": [],
        "pattern_md5": None,
        "wrote": [],
        "full": False,
        "poweroff": False,
        "errors": [],
    }
    for raw_line in _ESCAPE_RE.sub("", text).replace("\r", "\n").split("\n"):
        line = raw_line.strip()
        if "THINAIR-" not in line:
            continue
        if m := _BOOT_RE.search(line):
            info["boot_ok"] = True
            info["boot_count"] += 1
            info["uptime"] = float(m.group(1))
            info["disks"] = []
            info["pattern_md5"] = None
            info["full"] = False
        elif m := _DISK_RE.search(line):
            disk: DiskInfo = {"name": m.group(1), "size": int(m.group(2)), "head_md5": m.group(3)}
            info["disks"].append(disk)
        elif m := _PATTERN_RE.search(line):
            info["pattern_md5"] = m.group(1)
        elif m := _WROTE_RE.search(line):
            info["wrote"].append(int(m.group(1)))
        elif MARK_FULL in line:
            info["full"] = True
        elif MARK_POWEROFF in line:
            info["poweroff"] = True
        elif m := _ERROR_RE.search(line):
            info["errors"].append(m.group(1).strip())
    return info
