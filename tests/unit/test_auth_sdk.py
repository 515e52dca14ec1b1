"""Auth rules (no token, wrong, revoked, read-only) and the SDK's objects."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

import thinair
from tests.conftest import Engine


def test_token_rules(test_engine: Engine, storage_dir: Path) -> None:
    url = test_engine.settings.url + "/api/v1"
    admin = test_engine.client()
    ro = admin.tokens.create("reader", read_only=True)
    rw = admin.tokens.create("ci")
    assert ro.read_only and not rw.read_only and len(ro.token) >= 32
    names = {t.name: t for t in admin.tokens.list()}
    assert set(names) == {"admin", "reader", "ci"}
    assert "token" not in json.loads(names["ci"].model_dump_json())  # never listed again

    def call(method: str, path: str, token: str | None, **kw: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, url + path, headers=headers, **kw)  # type: ignore[arg-type]

    body = {"name": "sd", "path": str(storage_dir)}
    assert call("GET", "/vms", None).status_code == 401
    assert call("GET", "/health", None).status_code == 401
    assert call("GET", "/vms", "nope").status_code == 401
    assert call("GET", "/vms", ro.token).status_code == 200
    r = call("POST", "/storage_domains", ro.token, json=body)
    assert r.status_code == 403 and r.json()["code"] == "forbidden"
    assert call("POST", "/tokens", ro.token, json={"name": "x"}).status_code == 403
    assert admin.storage_domains.list() == []  # the refused call changed nothing
    assert call("POST", "/storage_domains", rw.token, json=body).status_code == 201

    admin.tokens.revoke("ci")
    r = call("GET", "/vms", rw.token)
    assert r.status_code == 401 and "revoked" in r.json()["message"]
    assert names["ci"].revoked_at is None and admin.tokens.list()[0].name == "admin"
    with pytest.raises(thinair.ThinairAPIError) as e:
        admin.tokens.create("reader")
    assert e.value.code == "conflict"


def test_cli_tokens(test_engine: Engine) -> None:
    secret = test_engine.cli("token", "create", "ops", "--read-only", check=True).stdout.strip()
    listed = json.loads(test_engine.cli("token", "list", "--json", check=True).stdout)
    assert {t["name"]: t["read_only"] for t in listed} == {"admin": False, "ops": True}
    r = httpx.get(
        test_engine.settings.url + "/api/v1/vms", headers={"Authorization": f"Bearer {secret}"}
    )
    assert r.status_code == 200
    test_engine.cli("token", "revoke", "ops", check=True)
    assert (
        httpx.get(
            test_engine.settings.url + "/api/v1/vms", headers={"Authorization": f"Bearer {secret}"}
        ).status_code
        == 401
    )


def test_sdk_objects(test_engine: Engine, storage_dir: Path, raw_image: Path) -> None:
    c = test_engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    vm = c.vms.create("obj", disks=[str(raw_image)], memory_mib=64)
    assert isinstance(vm, thinair.Vm)
    assert vm.start().state == "running"
    assert vm.refresh().state == "running"
    assert vm.stop(force=True).state == "stopped"
    final = storage_dir.parent / "final"
    final.mkdir(mode=0o755)
    c.storage_domains.add("final", str(final))
    job = vm.import_(to="final")  # stopped: an offline copy with qemu-img
    assert isinstance(job, thinair.Job)
    seen: list[str] = []
    done = job.wait(progress=lambda j: seen.append(j.state))
    assert done.state == "succeeded", done.error
    assert seen[-1] == "succeeded"
    assert vm.refresh().disks[0].location == "local"
    vm.remove()
    assert c.vms.list() == []


def test_hosts(test_engine: Engine) -> None:
    (host,) = test_engine.client().hosts.list()
    assert host.name == "local" and host.libvirt_uri == "test:///default"
    assert host.cpus > 0 and host.memory_mib > 0
    listed = json.loads(test_engine.cli("host", "list", "--json", check=True).stdout)
    assert listed[0]["name"] == "local"
    with pytest.raises(thinair.ThinairAPIError) as e:
        test_engine.client().hosts.get("elsewhere")
    assert e.value.status == 404


def test_https(make_engine: Callable[..., Engine], workdir: Path) -> None:
    """The engine serves HTTPS with a given certificate; the SDK verifies it."""
    cert, key = workdir / "engine.crt", workdir / "engine.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    engine = make_engine(
        "test:///default",
        start=False,
        THINAIR_TLS_CERT=str(cert),
        THINAIR_TLS_KEY=str(key),
        THINAIR_CA_CERT=str(cert),
    )
    engine.extra_env["THINAIR_URL"] = f"https://127.0.0.1:{engine.port}"
    engine.start()
    assert engine.client().health().status == "ok"
    with pytest.raises(httpx.ConnectError):  # not trusted without the CA
        httpx.get(f"https://127.0.0.1:{engine.port}/api/v1/openapi.json")
    with pytest.raises(httpx.RemoteProtocolError):  # no plain HTTP on the TLS port
        httpx.get(f"http://127.0.0.1:{engine.port}/api/v1/openapi.json")
