"""The engine over HTTP on libvirt's test driver: storage domains, VM life cycle,
auth, and bad input that must change nothing. Real SQLite and qemu-img."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import Engine
from thinair import models
from thinair.adapters import qemu_img
from thinair.client import Client, Job, ThinairAPIError


def test_storage_domains(test_engine: Engine, storage_dir: Path, workdir: Path) -> None:
    c = test_engine.client()
    sd = c.storage_domains.add("tmp", str(storage_dir))
    assert sd.name == "tmp" and sd.path == str(storage_dir) and sd.free_bytes
    assert [d.name for d in c.storage_domains.list()] == ["tmp"]
    assert c.storage_domains.get(sd.id).name == "tmp"
    other = workdir / "other"
    other.mkdir()
    for name, path, code in [
        ("tmp", str(other), "conflict"),  # name taken
        ("x", str(storage_dir), "conflict"),  # same directory
        ("y", str(storage_dir / "sub"), "invalid_input"),  # missing directory
        ("z", "relative/dir", "invalid_input"),
        ("bad name", str(other), "invalid_input"),
    ]:
        with pytest.raises(ThinairAPIError) as e:
            c.storage_domains.add(name, path)
        assert e.value.code == code, (name, path, e.value.message)
    assert [d.name for d in c.storage_domains.list()] == ["tmp"]
    c.storage_domains.remove("tmp")
    assert c.storage_domains.list() == []


def test_vm_life_cycle(test_engine: Engine, storage_dir: Path, raw_image: Path) -> None:
    c = test_engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    vm = c.vms.create("web1", disks=[str(raw_image)], memory_mib=128, cpus=2)
    assert vm.state == "stopped" and vm.phase == "ready"
    (disk,) = vm.disks
    assert disk.target == "vda" and disk.location == "external"
    assert disk.external_disk is not None
    assert disk.external_disk.format == "raw" and disk.virtual_size == 64 * 2**20
    info = qemu_img.info(disk.volume_path)
    assert info.format == "qcow2"
    assert info.backing_filename == str(raw_image)
    assert info.raw["backing-filename-format"] == "raw"
    assert info.virtual_size == disk.virtual_size

    assert c.vms.start("web1").state == "running"
    with pytest.raises(ThinairAPIError, match="running already"):
        c.vms.start("web1")
    with pytest.raises(ThinairAPIError, match="stop it first"):
        c.vms.remove("web1")
    assert c.vms.stop("web1").state == "stopped"
    c.vms.start("web1")
    c.vms.rollback("web1")
    assert c.vms.list() == []
    assert list(storage_dir.iterdir()) == []


def test_two_disks_and_remove(
    test_engine: Engine, storage_dir: Path, raw_image: Path, workdir: Path
) -> None:
    second = workdir / "second.qcow2"
    qemu_img.create(str(second), "qcow2", 32 * 2**20)
    c = test_engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    vm = c.vms.create("two", disks=[str(raw_image), f"{second},format=qcow2"])
    assert [(d.target, d.external_disk.format) for d in vm.disks if d.external_disk] == [
        ("vda", "raw"),
        ("vdb", "qcow2"),
    ]
    assert len(list(storage_dir.iterdir())) == 2
    c.vms.remove("two")
    assert list(storage_dir.iterdir()) == []


def test_bad_vm_input_creates_nothing(
    test_engine: Engine, storage_dir: Path, raw_image: Path, workdir: Path
) -> None:
    c = test_engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    c.vms.create("taken", disks=[str(raw_image)])
    before = sorted(storage_dir.iterdir())
    not_an_image = workdir / "dir"
    not_an_image.mkdir()
    cases = [
        (dict(name="taken", disks=[str(raw_image)]), "conflict", "exists already"),
        (dict(name="x", disks=[f"{raw_image},storage=nope"]), "not_found", "no storage domain"),
        (dict(name="x", disks=[str(workdir / "missing.img")]), "external_disk", "No such file"),
        (dict(name="x", disks=[str(not_an_image)]), "external_disk", "not a file"),
        (dict(name="x", disks=[f"{raw_image},format=qcow2"]), "external_disk", "qcow2"),
        (dict(name="x", disks=[str(raw_image), "nbd://127.0.0.1:1/x"]), "external_disk", "refused"),
    ]
    for kwargs, code, words in cases:
        with pytest.raises(ThinairAPIError) as e:
            c.vms.create(**kwargs)  # type: ignore[arg-type]
        assert e.value.code == code, (kwargs, e.value.message)
        assert words in e.value.message, (kwargs, e.value.message)
    assert [vm.name for vm in c.vms.list()] == ["taken"]
    assert sorted(storage_dir.iterdir()) == before


def test_malformed_bodies_get_4xx(test_engine: Engine) -> None:
    token = test_engine.settings.token_file.read_text().strip()
    http = httpx.Client(
        base_url=test_engine.settings.url + "/api/v1", headers={"Authorization": f"Bearer {token}"}
    )
    for body in [
        {},
        {"name": "a"},
        {"name": "a", "disks": []},
        {"name": "a<b>", "disks": [{"external_disk": {"url": "/x"}}]},
        {"name": "a", "memory_mib": -1, "disks": [{"external_disk": {"url": "/x"}}]},
        {"name": "a", "disks": [{"external_disk": {"url": "/x"}}], "extra": 1},
        [1, 2, 3],
        "text",
    ]:
        r = http.post("/vms", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["code"] == "invalid_input"
    assert http.get("/vms").json() == []


def test_storage_domain_full(make_engine: object, storage_dir: Path, raw_image: Path) -> None:
    engine = make_engine("test:///default", THINAIR_MIN_FREE_MIB=str(2**40))  # type: ignore[operator]
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    with pytest.raises(ThinairAPIError, match="is full") as e:
        c.vms.create("x", disks=[str(raw_image)])
    assert e.value.code == "storage"
    assert c.vms.list() == [] and list(storage_dir.iterdir()) == []


def test_auth(test_engine: Engine) -> None:
    url = test_engine.settings.url + "/api/v1/vms"
    assert httpx.get(url).status_code == 401
    r = httpx.get(url, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    token = test_engine.settings.token_file.read_text().strip()
    assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert oct(test_engine.settings.token_file.stat().st_mode & 0o777) == "0o600"
    spec = httpx.get(test_engine.settings.url + "/api/v1/openapi.json").json()
    assert "/api/v1/vms/{ref}/rollback" in spec["paths"]


def test_cli_json_and_errors(test_engine: Engine, storage_dir: Path, raw_image: Path) -> None:
    done = test_engine.cli("storage", "add", "tmp", str(storage_dir), "--json", check=True)
    assert json.loads(done.stdout)["name"] == "tmp"
    done = test_engine.cli(
        "vm", "create", "c1", "--memory", "128", "--disk", str(raw_image), "--json", check=True
    )
    vm = json.loads(done.stdout)
    assert vm["name"] == "c1" and vm["disks"][0]["external_disk"]["url"] == str(raw_image)
    done = test_engine.cli("vm", "start", "c1", "--json", check=True)
    assert json.loads(done.stdout)["state"] == "running"
    listed = json.loads(test_engine.cli("vm", "list", "--json", check=True).stdout)
    assert [v["name"] for v in listed] == ["c1"]
    assert "c1" in test_engine.cli("vm", "show", "c1", check=True).stdout
    bad = test_engine.cli("vm", "create", "c2", "--disk", "gopher://x/y")
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: unsupported URL scheme")
    assert "Traceback" not in bad.stderr
    missing = test_engine.cli("vm", "show", "nope")
    assert missing.returncode == 1 and "no VM 'nope'" in missing.stderr
    done = test_engine.cli("vm", "rollback", "c1", "--json", check=True)
    assert json.loads(done.stdout) == {"rolled_back": "c1"}


def test_cli_without_engine(workdir: Path) -> None:
    engine = Engine(home=workdir / "h", libvirt_uri="test:///default")
    done = engine.cli("vm", "list")
    assert done.returncode == 1
    assert "no thinair engine at" in done.stderr and "thinair engine" in done.stderr


def test_overlay_records_the_sources_holes(
    test_engine: Engine, storage_dir: Path, raw_image: Path
) -> None:
    """The source's holes are zero clusters in the overlay (no reads go to the
    source for them), and the overlay still reads exactly as the source."""
    c = test_engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    vm = c.vms.create("holes", disks=[str(raw_image)])
    overlay = vm.disks[0].volume_path
    done = subprocess.run(
        ["qemu-img", "map", "--output=json", overlay], check=True, capture_output=True, text=True
    )
    extents = json.loads(done.stdout)
    local_zero = [(e["start"], e["length"]) for e in extents if e["depth"] == 0 and e["zero"]]
    assert local_zero == [(2**20, 63 * 2**20)]  # raw_image: 1 MiB of data, then a hole
    from_source = [e for e in extents if e["depth"] == 1]
    assert [(e["start"], e["length"]) for e in from_source] == [(0, 2**20)]
    assert qemu_img.compare(overlay, str(raw_image), "qcow2", "raw")
    assert raw_image.stat().st_blocks * 512 == 2**20  # the source was not written


def test_one_flow_at_a_time(test_engine: Engine, storage_dir: Path, workdir: Path) -> None:
    """A second import, or a start, while an import runs gets a clear conflict;
    cancelling leaves the VM as it was."""
    source = workdir / "data.raw"
    with open(source, "wb") as f:
        f.write(os.urandom(8 * 2**20))
    c = test_engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    final = workdir / "final"
    final.mkdir(mode=0o755)
    c.storage_domains.add("final", str(final))
    c.vms.create("busy", disks=[f"{source},storage=tmp"])
    job = c.vms.import_("busy", to="final", bandwidth_mib=1)  # about 8 s
    with pytest.raises(ThinairAPIError) as e:
        c.vms.import_("busy", to="final")
    assert e.value.code == "conflict" and job.id in e.value.message
    deadline = time.monotonic() + 30
    while c.jobs.get(job.id).step != "copy vda" and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(ThinairAPIError) as e:
        c.vms.start("busy")
    assert e.value.code == "conflict" and "import is in progress" in e.value.message
    assert job.cancel().id == job.id
    assert job.wait().state == "cancelled"
    vm = c.vms.get("busy")
    assert vm.disks[0].location == "external" and list(final.iterdir()) == []
    c.vms.remove("busy")


def _race(*calls: Callable[[], object]) -> list[object]:
    """Run the calls at the same instant; each result or the error it raised."""
    barrier = threading.Barrier(len(calls))

    def go(call: Callable[[], object]) -> object:
        barrier.wait()
        try:
            return call()
        except ThinairAPIError as e:
            return e

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(go, calls))


def test_races_one_wins(test_engine: Engine, storage_dir: Path, workdir: Path) -> None:
    """Two imports of one disk at once (as import and as disk move), and remove
    during start: one wins, the other gets a clear conflict, state stays whole."""
    source = workdir / "data.raw"
    with open(source, "wb") as f:
        f.write(os.urandom(8 * 2**20))
    c = test_engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    final = workdir / "final"
    final.mkdir(mode=0o755)
    c.storage_domains.add("final", str(final))
    for round_ in range(3):
        _race_round(c, f"race{round_}", source, storage_dir, final)


def _race_round(c: Client, name: str, source: Path, storage_dir: Path, final: Path) -> None:
    disk = c.vms.create(name, disks=[f"{source},storage=tmp"]).disks[0]
    results = _race(
        lambda: c.vms.import_(name, to="final", bandwidth_mib=1),
        lambda: c.disks.move(disk.id, to="final", bandwidth_mib=1),
    )
    won = [r for r in results if isinstance(r, Job)]
    lost = [r for r in results if isinstance(r, ThinairAPIError)]
    assert len(won) == 1 and len(lost) == 1, results
    assert lost[0].code == "conflict", lost[0]
    assert len([j for j in c.jobs.list() if j.state in ("pending", "running")]) == 1
    won[0].cancel()
    assert won[0].wait().state in ("cancelled", "succeeded")

    results = _race(lambda: c.vms.start(name), lambda: c.vms.remove(name, force=True))
    errors = [r for r in results if isinstance(r, ThinairAPIError)]
    assert all(e.code in ("conflict", "not_found") for e in errors), errors
    if name in [vm.name for vm in c.vms.list()]:  # start won, remove was refused
        c.vms.remove(name, force=True)
    assert name not in [vm.name for vm in c.vms.list()]
    assert list(storage_dir.iterdir()) == [] and list(final.iterdir()) == []


def test_vm_listing_pages(test_engine: Engine, storage_dir: Path, raw_image: Path) -> None:
    """GET /vms?limit=&after= pages by name; a page's VMs are what GET /vms/{ref}
    says of each; the SDK reads every page."""
    c = test_engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    names = ["pg-e", "pg-a", "pg-d", "pg-b", "pg-c"]
    for name in names:
        c.vms.create(
            name, disks=[str(raw_image), "size=32M"] if name == "pg-b" else [str(raw_image)]
        )
    c.vms.start("pg-d")
    token = test_engine.settings.token_file.read_text().strip()
    http = httpx.Client(
        base_url=test_engine.settings.url, headers={"Authorization": f"Bearer {token}"}
    )
    everything = http.get("/api/v1/vms").json()
    assert [vm["name"] for vm in everything] == sorted(names)
    assert everything == [http.get(f"/api/v1/vms/{n}").json() for n in sorted(names)]
    assert {vm["name"]: vm["state"] for vm in everything}["pg-d"] == "running"

    pages, path = [], "/api/v1/vms?limit=2"
    while path:
        r = http.get(path)
        assert r.status_code == 200, r.text
        pages.append([vm["name"] for vm in r.json()])
        link = r.headers.get("link")
        path = link[1 : link.index(">")] if link else ""
    assert pages == [["pg-a", "pg-b"], ["pg-c", "pg-d"], ["pg-e"]]
    assert http.get("/api/v1/vms", params={"limit": 10, "after": "pg-bb"}).json() == everything[2:]
    assert http.get("/api/v1/vms", params={"after": "pg-e"}).json() == []
    for bad in ({"limit": 0}, {"limit": 1001}, {"limit": "x"}, {"after": "x" * 65}):
        r = http.get("/api/v1/vms", params=bad)
        assert r.status_code == 422 and r.json()["code"] == "invalid_input", (bad, r.text)

    listed = c.vms.list(page_size=2)
    assert [vm.model_dump() for vm in listed] == [
        models.Vm.model_validate(vm).model_dump() for vm in everything
    ]
    assert [vm.name for vm in c.vms.list()] == sorted(names)
