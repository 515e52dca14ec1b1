"""Latency hiding in the read path, each piece on and off: the guest reads the
right bytes (its own check of the pattern and of the disk's head against the
source), and the source sees what each piece should make it see: with the
bridge's cache, reads in whole cache blocks and no block read twice; with
copy-on-read, the temporary disk holds what the guest read; with the prefetch
(on by default), the rest of the source's data comes over once, and an import
then reads nothing over the link again."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Engine
from tests.e2e.conftest import wait_console
from tests.support import guest
from tests.support.far_source import FarSource, blocks_sent, reads

pytestmark = pytest.mark.guest

BLOCK = 1024 * 1024  # the default bridge_cache_block_kib
VARIANTS = {
    "passthrough": {"THINAIR_BRIDGE_CACHE": "off"},
    "no-readahead": {"THINAIR_BRIDGE_READAHEAD": "off"},
    "no-prefetch": {"THINAIR_BRIDGE_PREFETCH": "off"},
    "default": {},
    "copy-on-read": {"THINAIR_COPY_ON_READ": "on"},
}


def _top_layer_data(path: str) -> int:
    """Bytes of data allocated in the image itself (its backing chain not opened)."""
    opts = {"driver": "qcow2", "file": {"driver": "file", "filename": path}, "backing": None}
    done = subprocess.run(
        ["qemu-img", "map", "--output=json", "-U", f"json:{json.dumps(opts)}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return sum(e["length"] for e in json.loads(done.stdout) if e["data"] and not e.get("zero"))


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param("passthrough", marks=pytest.mark.slow),
        pytest.param("no-readahead", marks=pytest.mark.slow),
        pytest.param("no-prefetch", marks=pytest.mark.slow),
        "default",
        "copy-on-read",
    ],
)
def test_latency_hiding_reads_the_right_bytes(
    make_engine: Callable[..., Engine],
    guest_image: Path,
    workdir: Path,
    storage_dir: Path,
    variant: str,
) -> None:
    engine = make_engine("qemu:///system", **VARIANTS[variant])
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    log = workdir / "source.log"
    name = f"i15-{variant}"
    with FarSource(guest_image, workdir / "source.pid", delay_ms=10, log_file=log) as source:
        vm = c.vms.create(name, disks=[f"{source.url},storage=tmp"], memory_mib=256)
        probed = len(reads(log))  # the create's probe read the image's header directly
        c.vms.start(name)
        info = wait_console(c, name, lambda i: i["pattern_md5"] is not None and bool(i["wrote"]))
        c.vms.stop(name, force=True)
        seen = reads(log)[probed:]
    assert info["pattern_md5"] == guest.expected_pattern_md5()
    with open(guest_image, "rb") as f:
        head = hashlib.md5(f.read(guest.HEAD_MD5_SIZE)).hexdigest()
    assert info["disks"][0]["head_md5"] == head
    assert sum(length for _, length in seen) >= guest.PATTERN_SIZE
    if variant == "passthrough":
        assert any(length < BLOCK for _, length in seen)  # the guest's own small reads
    else:
        assert all(off % BLOCK == 0 and length % BLOCK == 0 for off, length in seen), seen[:20]
        sent = blocks_sent(seen, BLOCK)
        assert len(sent) == len(set(sent)), "a block crossed the link twice"
    overlay = vm.disks[0].volume_path
    if variant == "copy-on-read":
        assert _top_layer_data(overlay) >= guest.PATTERN_SIZE
    else:  # only what the guest wrote (its records), a few clusters
        assert _top_layer_data(overlay) < 4 * BLOCK
    c.vms.rollback(name)


@pytest.mark.slow
def test_second_vm_prefetches_the_first_ones_boot(
    make_engine: Callable[..., Engine], guest_image: Path, workdir: Path, storage_dir: Path
) -> None:
    """The first VM's boot reads are kept for its source when it is rolled back;
    the next VM's bridge fetches them before the guest asks, and the guest reads
    the right bytes."""
    engine = make_engine("qemu:///system", THINAIR_WORKING_SET="on")
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    log = workdir / "source.log"
    with FarSource(guest_image, workdir / "source.pid", delay_ms=10, log_file=log) as source:
        disk = f"{source.url},storage=tmp"
        c.vms.create("i15-first", disks=[disk], memory_mib=256)
        c.vms.start("i15-first")
        wait_console(c, "i15-first", lambda i: i["pattern_md5"] is not None)
        c.vms.rollback("i15-first")
        # In blocks: the guest's misses are one block each, the readahead's
        # stream reads two at a time.
        booted = len(reads(log))
        first = set(blocks_sent(reads(log), BLOCK))
        (kept,) = (engine.home / "working-sets").glob("*.json")
        wanted = set(blocks_sent(json.loads(kept.read_text())["blocks"], BLOCK))
        assert wanted and wanted <= first
        c.vms.create("i15-second", disks=[disk], memory_mib=256)
        deadline = time.monotonic() + 60
        while not wanted <= set(blocks_sent(reads(log)[booted:], BLOCK)):
            assert time.monotonic() < deadline, "the working set was not prefetched"
            time.sleep(0.2)
        prefetched = len(reads(log))
        c.vms.start("i15-second")
        info = wait_console(c, "i15-second", lambda i: i["pattern_md5"] is not None)
        assert info["pattern_md5"] == guest.expected_pattern_md5()
        again = blocks_sent(reads(log)[prefetched:], BLOCK)
        assert len(again) <= len(first - wanted) + len(first) // 4  # nearly all hits
        c.vms.rollback("i15-second")


def test_a_far_vm_is_prefetched_and_its_import_reads_nothing_twice(
    engine: Engine, domains: tuple[Path, Path], workdir: Path
) -> None:
    """On the default settings, the source's data that the guest does not read
    (here nothing boots: the firmware reads the first sector) comes into the
    bridge's cache in the background, every block once, holes never; the
    import then reads it from there, not over the link again, and the disk it
    leaves is the source's bytes."""
    image = workdir / "data.raw"
    data = [(0, 24), (40, 64)]  # MiB
    with open(image, "wb") as f:
        for start, end in data:
            f.seek(start * BLOCK)
            f.write(os.urandom((end - start) * BLOCK))
        f.truncate(96 * BLOCK)
    image.chmod(0o644)
    wanted = {b for start, end in data for b in range(start, end)}
    c = engine.client()
    log = workdir / "source.log"
    with FarSource(image, workdir / "source.pid", delay_ms=10, log_file=log) as source:
        vm = c.vms.create("i15-pre", disks=[f"{source.url},format=raw,storage=tmp"], memory_mib=64)
        probed = len(reads(log))  # the create's probe read the header directly
        c.vms.start("i15-pre")
        deadline = time.monotonic() + 60
        while not wanted <= set(blocks_sent(reads(log)[probed:], BLOCK)):
            assert time.monotonic() < deadline, "the source's data was not prefetched"
            time.sleep(0.2)
        prefetched = len(reads(log))
        final = c.vms.import_("i15-pre", to="final").wait(timeout=300)
        assert final.state == "succeeded", final.error
        seen = reads(log)[probed:]
        assert reads(log)[prefetched:] == []  # the import read the cache only
    sent = blocks_sent(seen, BLOCK)
    assert len(sent) == len(set(sent)), "a block crossed the link twice"
    assert set(sent) == wanted | {0}  # no hole (block 0: the firmware's read)
    c.vms.stop("i15-pre", force=True)
    volume = c.vms.get("i15-pre").disks[0].volume_path
    assert volume != vm.disks[0].volume_path
    subprocess.run(["qemu-img", "compare", "-U", volume, str(image)], check=True)
    c.vms.remove("i15-pre")
