"""Foreign images, end to end: the test guest converted with qemu-img to VMDK
(monolithic sparse, stream-optimized), VHDX, VDI, a two-layer qcow2 chain and
raw boots straight from an HTTP server (nginx, range requests) and from an NBD
export of the file's bytes (qemu-nbd -f raw: the format is read by the VM's
QEMU); one is imported, and the local disk holds what the source held plus what
the guest wrote."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Engine
from tests.e2e.conftest import sha256, wait_console
from tests.e2e.test_import import _check_final_disk
from tests.support import foreign, guest
from thinair.adapters import qemu_nbd

pytestmark = pytest.mark.guest

# Formats given on some, probed on the others.
GIVEN = {"vhdx", "vdi"}


@pytest.fixture
def http_cache(guest_image: Path, workdir: Path) -> Iterator[str]:
    """nginx serving the cached foreign images of the test guest."""
    with foreign.http_server(foreign.cache(guest_image), workdir) as url:
        yield url


def _url(
    kind: str,
    via: str,
    guest_image: Path,
    http_cache: str,
    nbd_export: Callable[..., qemu_nbd.Server],
) -> str:
    path = foreign.image(guest_image, kind)
    url = http_cache + path.name if via == "http" else nbd_export(path, fmt="raw").url
    fmt = foreign.KINDS[kind][1]
    return f"{url},format={fmt}" if kind in GIVEN else url


CASES = [(kind, "http") for kind in foreign.KINDS] + [
    (kind, "nbd") for kind in foreign.KINDS if kind != "qcow2-chain"
]


@pytest.mark.parametrize(("kind", "via"), CASES, ids=[f"{k}-{v}" for k, v in CASES])
def test_boots_from_foreign_image(
    engine: Engine,
    guest_image: Path,
    storage_dir: Path,
    http_cache: str,
    nbd_export: Callable[..., qemu_nbd.Server],
    kind: str,
    via: str,
) -> None:
    url = _url(kind, via, guest_image, http_cache, nbd_export)
    source = foreign.image(guest_image, kind)
    source_sum = sha256(source)
    c = engine.client()
    c.storage_domains.add("sd", str(storage_dir))
    name = f"fx-{kind}-{via}"
    vm = c.vms.create(name, disks=[url], memory_mib=256)
    (disk,) = vm.disks
    assert disk.external_disk is not None
    assert disk.external_disk.format == foreign.KINDS[kind][1]
    assert disk.virtual_size == guest.IMAGE_SIZE
    c.vms.start(name)
    info = wait_console(c, name, lambda i: i["boot_ok"] and len(i["wrote"]) >= 1)
    # The pattern region read through the foreign format is the guest's own.
    assert info["pattern_md5"] == guest.expected_pattern_md5()
    c.vms.rollback(name)
    assert list(storage_dir.iterdir()) == []
    assert sha256(source) == source_sum


@pytest.mark.parametrize("kind", ["vmdk-stream", "qcow2-chain"])
def test_import_foreign_image(
    engine: Engine, guest_image: Path, workdir: Path, http_cache: str, kind: str
) -> None:
    """Imported while the guest writes: the local disk has every record the guest
    reported, the pattern and boot area of the source, and no backing file."""
    for sd in ("tmp", "final"):
        (workdir / sd).mkdir(mode=0o755)
        engine.client().storage_domains.add(sd, str(workdir / sd))
    c = engine.client()
    name = f"fx-imp-{kind}"
    url = http_cache + foreign.image(guest_image, kind).name
    c.vms.create(name, disks=[f"{url},storage=tmp"], memory_mib=256)
    c.vms.start(name)
    wait_console(c, name, lambda i: i["boot_ok"] and len(i["wrote"]) >= 2)
    # The chain the default way (bulk: the engine's qemu-nbd decodes it): a
    # whole-chain mirror through QEMU 7.2's curl driver stalled for good here.
    strategy = ["--strategy", "mirror"] if kind == "vmdk-stream" else []
    engine.cli("vm", "import", name, "--to", "final", *strategy, check=True)
    before = len(guest.parse_console(c.vms.console(name).text)["wrote"])
    wait_console(c, name, lambda i: len(i["wrote"]) >= before + 2)
    c.vms.stop(name, force=True)
    _check_final_disk(c, name, guest_image)
    assert list((workdir / "tmp").iterdir()) == []
    c.vms.remove(name)


@pytest.mark.parametrize("via", ["path", "http"])
def test_boots_from_ova(
    engine: Engine, guest_image: Path, storage_dir: Path, http_cache: str, via: str
) -> None:
    """`vm create --ova`: the OVF gives name, memory and CPUs; the VMDK inside the
    tar is read in place through nbdkit's tar filter, never unpacked."""
    ova_path = foreign.guest_ova(guest_image, name="fx-appliance")
    source = str(ova_path) if via == "path" else http_cache + ova_path.name
    c = engine.client()
    c.storage_domains.add("sd", str(storage_dir))
    name = f"fx-ova-{via}"
    done = engine.cli("vm", "create", name, "--ova", source, "--cpus", "2", "--json", check=True)
    vm = c.vms.get(name)
    assert (vm.memory_mib, vm.cpus) == (256, 2)  # memory from the OVF, CPUs as given
    (disk,) = vm.disks
    assert disk.external_disk is not None and disk.external_disk.format == "vmdk"
    assert disk.external_disk.url.startswith("tar+") and "fx-appliance-disk1.vmdk" in done.stdout
    c.vms.start(name)
    info = wait_console(c, name, lambda i: i["boot_ok"] and len(i["wrote"]) >= 1)
    assert info["pattern_md5"] == guest.expected_pattern_md5()
    # Only the overlay was written: the storage domain holds nothing else.
    assert len(list(storage_dir.iterdir())) == 1
    c.vms.rollback(name)
    assert list(storage_dir.iterdir()) == []
    assert list((engine.home / "bridges").glob("*.sock")) == []


def test_ova_name_from_ovf(engine: Engine, guest_image: Path, storage_dir: Path) -> None:
    c = engine.client()
    c.storage_domains.add("sd", str(storage_dir))
    vm = c.vms.create(None, ova=str(foreign.guest_ova(guest_image, name="fx-appliance")))
    assert (vm.name, vm.memory_mib, vm.cpus) == ("fx-appliance", 256, 1)
    c.vms.rollback(vm.name)
