"""Provisioning: 50 VMs started from one template image that thinair exports,
each on its own overlay (no full copies), all served by the one export."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Engine
from tests.support.provision import provision, wait_kernels
from thinair.client import ThinairAPIError

pytestmark = [pytest.mark.guest, pytest.mark.slow, pytest.mark.timeout(2400)]

COUNT = int(os.environ.get("THINAIR_TEST_VMS", "50"))  # fewer to try it out
MEMORY = 128  # the test guest did not boot in 64 MiB here


def test_fifty_vms_from_one_export(engine: Engine, guest_image: Path, storage_dir: Path) -> None:
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    export = c.exports.create(image=str(guest_image), format="raw", shared=COUNT + 16)
    names = [f"so-prov-{i:02d}" for i in range(COUNT)]
    try:
        result = provision(engine.client, export.url, names, memory_mib=MEMORY)
        vms = {vm.name: vm for vm in c.vms.list()}
        assert all(vms[n].state == "running" for n in names)

        # Overlays only: one qcow2 per VM whose backing is the export (through the
        # VM's bridge), and all of them together take less than one copy.
        volumes = sorted(storage_dir.iterdir())
        assert len(volumes) == COUNT
        for name in names:
            (disk,) = vms[name].disks
            assert disk.location == "external" and disk.external_disk is not None
            assert disk.external_disk.url == export.url
            info = json.loads(  # -U: the running VM holds the image's lock
                subprocess.run(
                    ["qemu-img", "info", "-U", "--output=json", disk.volume_path],
                    check=True,
                    capture_output=True,
                ).stdout
            )
            assert info["format"] == "qcow2" and info["backing-filename"]
        used = sum(os.stat(v).st_blocks * 512 for v in volumes)
        assert used < os.stat(guest_image).st_size

        # Every guest loads its kernel from it: the one export serves them all at once.
        wait_kernels(c, result)
        served = c.exports.get(export.id)
        assert served.clients is not None and served.clients >= COUNT
        assert served.bytes_read
        print(
            f"{COUNT} VMs: created in {result.created:.1f} s, running in {result.running:.1f} s, "
            f"kernels loaded in {result.started:.1f} s ({len(result.booted)} booted by then); "
            f"export read {served.bytes_read / 2**20:.0f} MiB; "
            f"overlays {used / 2**20:.1f} MiB"
        )
    finally:
        for name in names:
            with contextlib.suppress(ThinairAPIError):  # not created: nothing to remove
                c.vms.remove(name, force=True)
    assert list(storage_dir.iterdir()) == []
