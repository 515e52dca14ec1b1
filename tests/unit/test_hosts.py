"""Hosts and the choice of one for a VM, on libvirt's test driver: hosts are
test:///FILE URIs whose node description gives each its own memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Engine
from thinair.client import ThinairAPIError

NODE = """<node>
  <cpu><mhz>2000</mhz><model>x86_64</model><active>2</active><nodes>1</nodes>
  <sockets>1</sockets><cores>2</cores><threads>1</threads></cpu>
  <memory>{kib}</memory>
</node>
"""


def _node(workdir: Path, name: str, mib: int) -> str:
    path = workdir / f"{name}.xml"
    path.write_text(NODE.format(kib=mib * 1024))
    return f"test://{path}"


def _error(call: object, *args: object, **kwargs: object) -> ThinairAPIError:
    with pytest.raises(ThinairAPIError) as e:
        call(*args, **kwargs)  # type: ignore[operator]
    return e.value


def test_hosts_add_list_show_remove(test_engine: Engine, workdir: Path) -> None:
    c = test_engine.client()
    (local,) = c.hosts.list()
    assert local.name == "local" and local.local and local.libvirt_uri == "test:///default"
    big = _node(workdir, "big", 8192)
    added = c.hosts.add("big", big)
    assert added.reachable and not added.local and added.memory_mib == 8192
    assert added.free_memory_mib == 8192 and added.vms == 0
    for name, uri, code in [
        ("big", _node(workdir, "other", 1024), "conflict"),  # name taken
        ("big2", big, "conflict"),  # URI taken
        ("self", "test:///default", "conflict"),  # the local host
        ("web", "http://example.com/", "invalid_input"),
        ("nowhere", "qemu+tcp://127.0.0.1:1/system", "invalid_input"),  # nobody answers
        ("bad name", big, "invalid_input"),
    ]:
        assert _error(c.hosts.add, name, uri).code == code, (name, uri)
    assert [h.name for h in c.hosts.list()] == ["local", "big"]
    assert c.hosts.get("big").id == added.id
    assert _error(c.hosts.get, "nowhere").code == "not_found"
    assert _error(c.hosts.remove, "local").code == "conflict"

    # The CLI, as a user types it.
    small = _node(workdir, "small", 256)
    shown = json.loads(test_engine.cli("host", "add", "small", small, "--json", check=True).stdout)
    assert shown["name"] == "small" and shown["memory_mib"] == 256
    listed = json.loads(test_engine.cli("host", "list", "--json", check=True).stdout)
    assert [h["name"] for h in listed] == ["local", "big", "small"]
    assert "256 MiB" in test_engine.cli("host", "show", "small", check=True).stdout
    test_engine.cli("host", "remove", "small", check=True)
    c.hosts.remove("big")
    assert [h.name for h in c.hosts.list()] == ["local"]


def test_host_choice(test_engine: Engine, workdir: Path, raw_image: Path) -> None:
    c = test_engine.client()
    c.hosts.add("big", _node(workdir, "big", 8192))
    c.hosts.add("small", _node(workdir, "small", 256))
    shared = workdir / "shared"
    own = workdir / "own"
    shared.mkdir()
    own.mkdir()
    sd = c.storage_domains.add("shared", str(shared))
    assert sd.shared and sd.host is None
    sd = c.storage_domains.add("own", str(own), host="small")
    assert not sd.shared and sd.host == "small"
    assert _error(c.storage_domains.add, "x", str(workdir), host="nowhere").code == "not_found"

    # The most free memory among the hosts that reach the storage.
    assert c.vms.create("a", [f"{raw_image},storage=shared"], memory_mib=512).host == "big"
    assert c.vms.create("b", [f"{raw_image},storage=own"], memory_mib=128).host == "small"
    vm = c.vms.create("c", [f"{raw_image},storage=shared"], memory_mib=512, host="local")
    assert vm.host == "local"
    assert {h.name: h.vms for h in c.hosts.list()} == {"local": 1, "big": 1, "small": 1}

    # No host fits: a clear error, nothing created.
    before = sorted(p.name for p in own.iterdir())
    e = _error(c.vms.create, "d", [f"{raw_image},storage=own"], memory_mib=1024)
    assert e.code == "conflict" and "small has 256 MiB free, 1024 MiB needed" in e.message
    e = _error(c.vms.create, "d", [f"{raw_image},storage=own"], memory_mib=64, host="big")
    assert e.code == "conflict" and "big does not reach storage domain own" in e.message
    e = _error(c.vms.create, "d", [f"{raw_image},storage=shared"], host="nowhere")
    assert e.code == "not_found"
    assert sorted(p.name for p in own.iterdir()) == before
    assert sorted(v.name for v in c.vms.list()) == ["a", "b", "c"]

    # A stopped VM moves when started on another host; a running one does not.
    moved = c.vms.start("a", host="local")
    assert moved.host == "local" and moved.state == "running"
    assert c.vms.get("a").host == "local"
    e = _error(c.vms.start, "c", host="small")  # 512 MiB: small has too little
    assert e.code == "conflict" and "small has" in e.message
    assert c.vms.get("c").host == "local"
    e = _error(c.vms.start, "a", host="big")
    assert e.code == "conflict" and "stop it first" in e.message

    # A host with VMs or storage of its own stays.
    assert _error(c.hosts.remove, "small").code == "conflict"  # VM b
    c.vms.stop("a", force=True)
    for name in ("a", "b", "c"):
        c.vms.remove(name)
    assert _error(c.hosts.remove, "small").code == "conflict"  # storage domain own
    c.storage_domains.remove("own")
    c.hosts.remove("small")
