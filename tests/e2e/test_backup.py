"""Backup preview, end to end: a VM runs from a chain of qcow2 backups (a full
one and an incremental on top, as backup tools write them), its writes going to
a throw-away overlay. Discarded, nothing is left; restored, the local disk is
the backup plus exactly what the guest wrote."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import Engine
from tests.e2e.conftest import image_reader, sha256, wait_console
from tests.e2e.test_import import _check_final_disk
from tests.support import foreign, guest

pytestmark = pytest.mark.guest


@pytest.fixture
def backup_chain(guest_image: Path, workdir: Path) -> Path:
    """A copy of the cached two-layer chain (the incremental names the full one
    by a relative path); the copy, because libvirt relabels a local chain."""
    top = foreign.image(guest_image, "qcow2-chain")
    base = top.with_name(f"{guest_image.stem}-chain-base.qcow2")
    backups = workdir / "backups"
    backups.mkdir(mode=0o755)
    for path in (base, top):
        shutil.copy(path, backups / path.name)
    return backups / top.name


def _domains(engine: Engine, workdir: Path) -> None:
    for sd in ("tmp", "final"):
        (workdir / sd).mkdir(mode=0o755)
        engine.client().storage_domains.add(sd, str(workdir / sd))


def test_preview_then_discard_leaves_nothing(
    engine: Engine, backup_chain: Path, workdir: Path
) -> None:
    _domains(engine, workdir)
    sums = {p: sha256(p) for p in backup_chain.parent.iterdir()}
    engine.cli(
        "backup",
        "preview",
        str(backup_chain),
        "--name",
        "fx-bk1",
        "--storage",
        "tmp",
        "--memory",
        "256",
        check=True,
    )
    c = engine.client()
    assert c.vms.get("fx-bk1").state == "running"
    info = wait_console(c, "fx-bk1", lambda i: i["boot_ok"] and len(i["wrote"]) >= 2)
    assert info["pattern_md5"] == guest.expected_pattern_md5()
    engine.cli("vm", "rollback", "fx-bk1", check=True)
    assert c.vms.list() == []
    assert list((workdir / "tmp").iterdir()) == []
    assert {p: sha256(p) for p in backup_chain.parent.iterdir()} == sums


def test_preview_then_restore(
    engine: Engine, backup_chain: Path, guest_image: Path, workdir: Path
) -> None:
    _domains(engine, workdir)
    sums = {p: sha256(p) for p in backup_chain.parent.iterdir()}
    engine.cli(
        "backup",
        "preview",
        str(backup_chain),
        "--name",
        "fx-bk2",
        "--storage",
        "tmp",
        "--memory",
        "256",
        check=True,
    )
    c = engine.client()
    wait_console(c, "fx-bk2", lambda i: i["boot_ok"] and len(i["wrote"]) >= 2)
    engine.cli("backup", "restore", "fx-bk2", "--to", "final", check=True)
    before = len(guest.parse_console(c.vms.console("fx-bk2").text)["wrote"])
    wait_console(c, "fx-bk2", lambda i: len(i["wrote"]) >= before + 2)
    c.vms.stop("fx-bk2", force=True)
    _check_final_disk(c, "fx-bk2", guest_image)
    # Beyond the records the guest wrote (header and slots), every byte is the
    # backup's: the chain's data, read through both layers.
    (disk,) = c.vms.get("fx-bk2").disks
    step = 16 * guest.MIB
    with image_reader(disk.volume_path, disk.volume_format) as read, open(guest_image, "rb") as src:
        for start, end in [(0, guest.HEADER_OFFSET), (guest.SLOTS_END, guest.IMAGE_SIZE)]:
            for offset in range(start, end, step):
                src.seek(offset)
                assert read(offset, step) == src.read(step), f"differs at {offset}"
    assert list((workdir / "tmp").iterdir()) == []
    assert {p: sha256(p) for p in backup_chain.parent.iterdir()} == sums
    c.vms.remove("fx-bk2")
