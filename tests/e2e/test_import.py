"""Import, end to end: a booting guest keeps writing while its external disk is
copied home; afterwards every write it made is in the final disk, the source never
changed, nothing temporary is left, and the guest runs on after the source is gone."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import event

from tests.conftest import Engine
from tests.e2e.conftest import image_reader, sha256, wait_console
from tests.e2e.test_run import domain
from tests.support import guest
from thinair import models
from thinair.adapters import qemu_img, qemu_nbd
from thinair.client import Client, ThinairAPIError
from thinair.engine import imports
from thinair.engine.build import build

pytestmark = pytest.mark.guest


def _check_final_disk(client: Client, vm_name: str, guest_image: Path) -> None:
    """After a forced stop: every record the guest reported is on the final disk,
    and the data it did not write is the source's."""
    wrote = guest.parse_console(client.vms.console(vm_name).text)["wrote"]
    (disk,) = client.vms.get(vm_name).disks
    assert disk.location == "local" and disk.external_disk is None
    info = qemu_img.info(disk.volume_path, disk.volume_format)
    assert info.backing_filename is None
    with image_reader(disk.volume_path, disk.volume_format) as read:
        records = guest.decode_records(read)
        pattern = read(guest.PATTERN_OFFSET, guest.PATTERN_SIZE)
        boot_area = read(0, guest.FAT_SIZE)
    assert wrote and set(wrote) <= {r.seq for r in records}
    assert pattern == guest.expected_pattern()
    with open(guest_image, "rb") as f:
        assert boot_area == f.read(guest.FAT_SIZE)


def _finish(client: Client, vm_name: str, guest_image: Path) -> None:
    """After an import: the guest goes on writing on its final disk; then stop it,
    check the disk (_check_final_disk) and remove the VM."""
    before = len(guest.parse_console(client.vms.console(vm_name).text)["wrote"])
    wait_console(client, vm_name, lambda i: len(i["wrote"]) >= before + 2)
    client.vms.stop(vm_name, force=True)
    _check_final_disk(client, vm_name, guest_image)
    client.vms.remove(vm_name)


@pytest.mark.parametrize(
    ("strategy", "first_home"), [("bulk", "tmp"), ("bulk", "final"), ("mirror", "tmp")]
)
def test_live_import_keeps_every_write(
    engine: Engine,
    guest_export: qemu_nbd.Server,
    guest_image: Path,
    domains: tuple[Path, Path],
    strategy: str,
    first_home: str,
) -> None:
    source_sum = sha256(guest_image)
    tmp, final = domains
    c = engine.client()
    c.vms.create("imp", disks=[f"{guest_export.url},storage={first_home}"], memory_mib=256)
    c.vms.start("imp")
    wait_console(c, "imp", lambda i: i["boot_ok"] and len(i["wrote"]) >= 2)

    done = engine.cli(
        "vm", "import", "imp", "--to", "final", "--strategy", strategy, "--json", check=True
    )
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[-1]["state"] == "succeeded"
    assert any(line["progress"].get("done", 0) > 0 for line in lines)
    # The guest kept writing through the import and the switch.
    before = len(guest.parse_console(c.vms.console("imp").text)["wrote"])
    wait_console(c, "imp", lambda i: len(i["wrote"]) >= before + 3)

    # Local only: libvirt shows no network layer, and the source can go away.
    live = domain("imp").XMLDesc(0)  # type: ignore[union-attr]
    assert "<backingStore type='network'" not in live and "protocol='nbd'" not in live
    guest_export.stop()
    after_stop = len(guest.parse_console(c.vms.console("imp").text)["wrote"])
    wait_console(c, "imp", lambda i: len(i["wrote"]) >= after_stop + 3)
    assert c.vms.get("imp").state == "running"

    c.vms.stop("imp", force=True)
    _check_final_disk(c, "imp", guest_image)
    assert list(tmp.iterdir()) == []
    assert len(list(final.iterdir())) == 1
    assert sha256(guest_image) == source_sum
    # The VM runs again from its local disk, the source still gone.
    c.vms.start("imp")
    wait_console(c, "imp", lambda i: i["boot_ok"] and len(i["wrote"]) >= 1)
    with pytest.raises(ThinairAPIError, match="local already"):
        c.vms.rollback("imp")
    c.vms.remove("imp", force=True)
    assert list(final.iterdir()) == []


def test_offline_import_and_bad_requests(
    engine: Engine, guest_export: qemu_nbd.Server, guest_image: Path, domains: tuple[Path, Path]
) -> None:
    tmp, final = domains
    c = engine.client()
    c.vms.create("off", disks=[f"{guest_export.url},storage=tmp"], memory_mib=256)
    c.vms.start("off")
    wait_console(c, "off", lambda i: i["boot_ok"] and len(i["wrote"]) >= 2)
    c.vms.stop("off", timeout=60)

    for kwargs, words in [
        (dict(to="nope"), "no storage domain"),
        (dict(to="final", strategy="pull"), "'bulk', 'mirror' or 'stream'"),
    ]:
        with pytest.raises(ThinairAPIError, match=words):
            c.vms.import_("off", **kwargs)  # type: ignore[arg-type]
    assert c.jobs.list() == []

    job = c.vms.import_("off", to="final")  # a stopped VM is copied with qemu-img
    assert c.jobs.wait(job.id).state == "succeeded"
    with pytest.raises(ThinairAPIError, match="no external disk"):
        c.vms.import_("off", to="final")
    _check_final_disk(c, "off", guest_image)
    assert list(tmp.iterdir()) == []
    c.vms.remove("off")


@pytest.mark.parametrize("strategy", ["bulk", "mirror"])
def test_cancel_and_rollback_during_import(
    engine: Engine, guest_export: qemu_nbd.Server, domains: tuple[Path, Path], strategy: str
) -> None:
    tmp, final = domains
    c = engine.client()
    c.vms.create("can", disks=[f"{guest_export.url},storage=tmp"], memory_mib=256)
    c.vms.start("can")
    wait_console(c, "can", lambda i: i["boot_ok"])

    # A slow copy (1 MiB/s) we cancel: the VM goes on on its temporary disk.
    job = c.vms.import_("can", to="final", strategy=strategy, bandwidth_mib=1)
    _wait_step(c, job.id, "copy")
    c.jobs.cancel(job.id)
    assert c.jobs.wait(job.id).state == "cancelled"
    vm = c.vms.get("can")
    assert vm.state == "running" and vm.disks[0].location == "external"
    assert list(final.iterdir()) == []
    before = len(guest.parse_console(c.vms.console("can").text)["wrote"])
    wait_console(c, "can", lambda i: len(i["wrote"]) >= before + 2)

    # Again, and roll the VM back in the middle of it.
    job = c.vms.import_("can", to="final", strategy=strategy, bandwidth_mib=1)
    _wait_step(c, job.id, "copy")
    c.vms.rollback("can")
    assert c.jobs.get(job.id).state == "cancelled"
    assert domain("can") is None
    assert list(tmp.iterdir()) == [] and list(final.iterdir()) == []


def test_engine_killed_mid_import_resumes(
    engine: Engine, guest_export: qemu_nbd.Server, guest_image: Path, workdir: Path
) -> None:
    final = workdir / "final"
    final.mkdir(mode=0o755)
    c = engine.client()
    c.storage_domains.add("final", str(final))
    c.vms.create("res", disks=[guest_export.url], memory_mib=256)
    c.vms.start("res")
    wait_console(c, "res", lambda i: i["boot_ok"] and len(i["wrote"]) >= 1)
    job = c.vms.import_("res", to="final", bandwidth_mib=4)
    _wait_step(c, job.id, "copy")
    engine.stop(signal.SIGKILL)
    engine.start()  # resumes the job by itself
    c = engine.client()
    assert c.jobs.wait(job.id).state == "succeeded"
    before = len(guest.parse_console(c.vms.console("res").text)["wrote"])
    wait_console(c, "res", lambda i: len(i["wrote"]) >= before + 2)
    c.vms.stop("res", force=True)
    _check_final_disk(c, "res", guest_image)
    c.vms.remove("res")


def test_import_looks_the_vm_host_up_once(
    engine: Engine, guest_export: qemu_nbd.Server, guest_image: Path, domains: tuple[Path, Path]
) -> None:
    """A live import finds the libvirt connection of the VM's host once: the flow
    polls libvirt every 0.1 s, and each lookup of the host is a database query.
    The import runs in this process, on the engine's home, to count the queries."""
    c = engine.client()
    c.vms.create("a16-once", disks=[f"{guest_export.url},storage=tmp"], memory_mib=256)
    c.vms.start("a16-once")
    wait_console(c, "a16-once", lambda i: i["boot_ok"] and len(i["wrote"]) >= 1)
    engine.stop()  # the VM runs on; this process takes the engine's place

    ctx = build(engine.settings)
    runner = ctx.jobs
    lookups: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.startswith("SELECT vms.host_id \nFROM vms \nWHERE vms.name"):
            lookups.append(statement)

    event.listen(ctx.db.engine, "before_cursor_execute", count)
    try:
        job = imports.start(ctx, runner, "a16-once", models.ImportRequest(to="final"))
        runner.wait(job.id, lambda j: j.state not in ("pending", "running"), timeout=600)
        done = runner.get(job.id)
        assert done.state == "succeeded", done.error
    finally:
        event.remove(ctx.db.engine, "before_cursor_execute", count)
        ctx.close()
    assert len(lookups) <= 1, f"{len(lookups)} lookups of the VM's host"
    engine.start()
    _finish(engine.client(), "a16-once", guest_image)


def _wait_step(c: Client, job_id: str, prefix: str, timeout: float = 120) -> None:
    """Wait until the job is copying (its step starts with `prefix`, some bytes done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.jobs.get(job_id)
        if job.step.startswith(prefix) and job.progress.get("done", 0) > 0:
            return
        if job.state not in ("pending", "running"):
            raise AssertionError(f"job ended before {prefix}: {job}")
        time.sleep(0.2)
    raise AssertionError(f"job never reached {prefix}")


def test_sdk_example_quick_import(
    engine: Engine, guest_export: qemu_nbd.Server, guest_image: Path, storage_dir: Path
) -> None:
    """examples/quick_import.py, run as a user would, keeps a VM out of thin air."""
    from tests.conftest import ROOT
    from tests.support.engine import VENV_BIN

    engine.client().storage_domains.add("final", str(storage_dir))
    done = subprocess.run(
        [
            str(VENV_BIN / "python"),
            str(ROOT / "examples" / "quick_import.py"),
            guest_export.url,
            "--name",
            "quick",
            "--to",
            "final",
            "--memory",
            "256",
        ],
        env=engine.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "quick is running" in done.stdout
    assert "runs on local storage only" in done.stdout
    c = engine.client()
    wait_console(c, "quick", lambda i: i["boot_ok"] and len(i["wrote"]) >= 1)
    c.vms.stop("quick", force=True)
    _check_final_disk(c, "quick", guest_image)
    discard = subprocess.run(
        [
            str(VENV_BIN / "python"),
            str(ROOT / "examples" / "quick_import.py"),
            guest_export.url,
            "--name",
            "gone",
            "--to",
            "final",
            "--discard",
        ],
        env=engine.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert discard.returncode == 0, discard.stderr
    assert [vm.name for vm in c.vms.list()] == ["quick"]
    c.vms.remove("quick")
    assert list(storage_dir.iterdir()) == []
