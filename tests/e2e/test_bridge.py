"""NBD external disks are read through a local nbdkit bridge: the source server
may restart mid-import without losing anything, and a VM reads an NBD-over-TLS
(PSK) export without the key reaching libvirt or QEMU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import Engine
from tests.e2e.conftest import wait_console
from tests.e2e.test_import import _check_final_disk, _finish, _wait_step
from tests.e2e.test_run import domain
from tests.support import guest
from thinair.adapters import procfs, qemu_nbd

pytestmark = pytest.mark.guest


def test_source_restart_mid_import_loses_nothing(
    engine: Engine, guest_image: Path, storage_dir: Path
) -> None:
    server = qemu_nbd.Server(str(guest_image), export_name="disk")
    server.start()
    try:
        c = engine.client()
        c.storage_domains.add("final", str(storage_dir))
        c.vms.create("rs", disks=[server.url], memory_mib=256)
        c.vms.start("rs")
        wait_console(c, "rs", lambda i: i["boot_ok"] and len(i["wrote"]) >= 1)
        # A slow copy (8 MiB/s for ~74 MiB of data), so the outage lands inside it.
        job = c.vms.import_("rs", to="final", bandwidth_mib=8)
        _wait_step(c, job.id, "copy")
        server.stop()
        time.sleep(4)  # the source is gone: reads stall in the bridge's retries
        assert c.jobs.get(job.id).state == "running"
        server = qemu_nbd.Server(str(guest_image), export_name="disk", port=server.port)
        server.start()
        final = c.jobs.wait(job.id, timeout=300)
        assert final.state == "succeeded", final.error
        _finish(c, "rs", guest_image)
    finally:
        server.stop()


def test_vm_reads_a_tls_psk_export(engine: Engine, guest_image: Path, storage_dir: Path) -> None:
    exported = json.loads(
        engine.cli("expose", str(guest_image), "--tls", "psk", "--json", check=True).stdout
    )
    url = exported["url"]
    assert url.startswith("nbds://") and "tls-psk-file=" in url
    key = Path(exported["psk_file"]).read_text().split(":")[1].strip()
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    vm = c.vms.create("tls", disks=[url], memory_mib=256)
    assert vm.disks[0].external_disk is not None and vm.disks[0].external_disk.format == "raw"
    c.vms.start("tls")
    info = wait_console(c, "tls", lambda i: i["boot_ok"] and i["pattern_md5"] is not None)
    assert info["pattern_md5"] == guest.expected_pattern_md5()
    # The key is held by the bridge only: not in libvirt's XML, not in QEMU's argv.
    assert key not in domain("tls").XMLDesc(0)  # type: ignore[union-attr]
    qemus = procfs.find(frozenset({"qemu-system-x86_64"}), "guest=tls,")
    assert len(qemus) == 1 and key not in next(iter(qemus.values()))
    assert "tls-psk-file" not in next(iter(qemus.values()))
    c.vms.rollback("tls")
    assert list(storage_dir.iterdir()) == []
    engine.cli("unexpose", exported["id"], check=True)


def test_import_releases_thinairs_own_export(
    engine: Engine, guest_image: Path, storage_dir: Path
) -> None:
    exported = json.loads(engine.cli("expose", str(guest_image), "--json", check=True).stdout)
    c = engine.client()
    c.storage_domains.add("final", str(storage_dir))
    c.vms.create("own", disks=[exported["url"]], memory_mib=256)
    c.vms.start("own")
    wait_console(c, "own", lambda i: i["boot_ok"] and len(i["wrote"]) >= 1)
    assert c.vms.import_("own", to="final").wait().state == "succeeded"
    assert json.loads(engine.cli("exports", "--json", check=True).stdout) == []
    assert procfs.find(frozenset({"qemu-nbd"}), str(engine.home)) == {}
    before = len(guest.parse_console(c.vms.console("own").text)["wrote"])
    wait_console(c, "own", lambda i: len(i["wrote"]) >= before + 2)  # runs on, source gone
    c.vms.stop("own", force=True)
    _check_final_disk(c, "own", guest_image)
    c.vms.remove("own")
