"""One rule through every door: every route of the OpenAPI document that takes
a local path or a URL (the fields marked x-thinair-local) is tried with the
same escapes out of THINAIR_IMAGE_ROOTS (plain paths, file://, "..", json:,
symlinks inside a root, a TLS key or a socket named in a URL, a qcow2 under a
root whose backing file is outside), through the REST API, the SDK and the CLI.
Each must be refused with a 400 that says the file is outside, the same answer
for a file that exists and one that does not, and nothing may change."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import module_engine
from tests.support.engine import Engine
from thinair.cli import app
from thinair.client import Client, ThinairAPIError

# Refused by their syntax before any root is looked at: any 400 will do.
SYNTAX = {
    "{root}/../../../etc/shadow",
    'json:{{"file.filename": "/etc/shadow"}}',
}
# Outside the roots whichever way they are named. "{root}" is a directory under
# THINAIR_IMAGE_ROOTS; its links point out of it.
PATH_ESCAPES = [
    "/etc/shadow",
    "/etc/no-such-file-i19",
    "/root",
    "/",
    "/proc/self/root/etc/shadow",
    "{root}-sibling/disk.raw",  # a name sharing the root's prefix, not under it
    "{root}/../../../etc/shadow",
    "{root}/shadow-link.raw",  # a symlink to /etc/shadow
    "{root}/etc-link/shadow",  # through a symlinked directory
    "{root}/etc-link",
]
URL_ESCAPES = [
    *PATH_ESCAPES,
    "file:///etc/shadow",
    "file://localhost/etc/shadow",
    "file:///proc/self/root/etc/shadow",
    'json:{{"file.filename": "/etc/shadow"}}',
    "tar+file:///etc/shadow#disk.raw",
    "tar+file://{root}/shadow-link.raw#disk.raw",
    "nbds://127.0.0.1/x?tls-psk-file=/etc/shadow",
    "nbds://127.0.0.1/x?tls-certificates=/root",
    "nbds://127.0.0.1/x?tls-psk-file={root}/shadow-link.raw",
    "nbd+unix:///x?socket=/run/libvirt/libvirt-sock",
    "nbd+unix:///x?socket={root}/etc-link/no.sock",
    "{root}/evil.qcow2",  # under the root, its backing file /etc/shadow is not
]

# A host's libvirt URI names no local file nor program: the test driver reads
# the file it names and quotes its first line back in the error.
LIBVIRT_ESCAPES = [
    "test:///etc/shadow",
    "test://{root}/shadow-link.raw",
    "qemu+ssh://localhost/system?command=/bin/false",
    "qemu+ssh://localhost/system?netcat=/bin/false",
    "qemu:///system?socket=/etc/shadow",
    "qemu+libssh://localhost/system?known_hosts=/x&command=/bin/false",
]

# Every field the walk must find, with a request that puts X there and is
# good otherwise. A new route or field taking a path fails the test until it
# is added here (and so checked).
ROUTES: dict[tuple[str, str, str], dict[str, Any]] = {
    ("post", "/api/v1/vms", "disks.external_disk.url"): {
        "name": "i19-vm",
        "memory_mib": 64,
        "disks": [{"external_disk": {"url": "X"}}],
    },
    ("post", "/api/v1/vms", "ova"): {"name": "i19-vm", "ova": "X", "storage_domain": "sd"},
    ("post", "/api/v1/probe", "url"): {"url": "X"},
    ("post", "/api/v1/exports", "image"): {"image": "X"},
    ("post", "/api/v1/exports", "tls_dir"): {"image": "{image}", "tls": "psk", "tls_dir": "X"},
    ("post", "/api/v1/exports", "unix"): {"image": "{image}", "unix": "X"},
    ("post", "/api/v1/storage_domains", "path"): {"name": "i19-sd", "path": "X"},
    ("post", "/api/v1/hosts", "libvirt_uri"): {"name": "i19-host", "libvirt_uri": "X"},
}
# Property names that smell of a file: each must carry the mark.
FILE_WORDS = ("url", "uri", "path", "image", "dir", "file", "socket", "unix", "ova", "cert", "key")


@dataclass
class Setup:
    engine: Engine
    client: Client
    root: Path
    image: Path

    def fill(self, value: Any, x: str) -> Any:
        if isinstance(value, str):
            return x if value == "X" else value.replace("{image}", str(self.image))
        if isinstance(value, dict):
            return {k: self.fill(v, x) for k, v in value.items()}
        if isinstance(value, list):
            return [self.fill(v, x) for v in value]
        return value

    def escape(self, text: str) -> str:
        return text.replace("{root}", str(self.root)).replace("{{", "{").replace("}}", "}")

    def state(self) -> dict[str, Any]:
        c = self.client
        return {
            "vms": sorted(v.name for v in c.vms.list()),
            "storage": sorted(d.name for d in c.storage_domains.list()),
            "exports": sorted(e.name for e in c.exports.list()),
            "files": sorted(str(p) for p in self.root.rglob("*")),
            "etc": sorted(p.name for p in Path("/etc").glob("*.sock")),
        }


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    with module_engine("roots") as (engine, base):
        root = base / "images"  # the engine's only image root
        engine.extra_env["THINAIR_IMAGE_ROOTS"] = str(root)
        (root / "sd").mkdir(mode=0o755, parents=True)
        (base / "images-sibling").mkdir(mode=0o755)
        image = root / "image.raw"
        for path in (image, base / "images-sibling" / "disk.raw"):
            with open(path, "wb") as f:
                f.truncate(16 * 2**20)
        os.symlink("/etc/shadow", root / "shadow-link.raw")
        os.symlink("/etc", root / "etc-link")
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw"]
            + [str(root / "evil.qcow2"), "16M"],
            check=True,
        )
        engine.start()
        client = engine.client()
        client.storage_domains.add("sd", str(root / "sd"))
        yield Setup(engine, client, root, image)


@pytest.fixture
def unchanged(setup: Setup) -> Iterator[None]:
    before = setup.state()
    yield
    assert setup.state() == before, "a refused request changed something"


def _walk(schema: dict[str, Any], defs: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted names of the marked properties of `schema` (following $ref, arrays, anyOf)."""
    if "$ref" in schema:
        yield from _walk(defs[schema["$ref"].rsplit("/", 1)[1]], defs, prefix)
        return
    for sub in schema.get("anyOf", []) + schema.get("allOf", []):
        yield from _walk(sub, defs, prefix)
    if "items" in schema:
        yield from _walk(schema["items"], defs, prefix)
    for name, prop in schema.get("properties", {}).items():
        if "x-thinair-local" in prop:
            yield prefix + name
        else:
            yield from _walk(prop, defs, f"{prefix}{name}.")


def _openapi(setup: Setup) -> dict[str, Any]:
    with httpx.Client(base_url=setup.engine.env["THINAIR_URL"]) as h:
        doc: dict[str, Any] = h.get("/api/v1/openapi.json").json()
    return doc


def test_the_walk_finds_every_field(setup: Setup) -> None:
    """The routes below are all the OpenAPI document has, and every request
    property whose name smells of a file is marked (so the walk sees it)."""
    doc = _openapi(setup)
    defs = doc["components"]["schemas"]
    found = set()
    for route, methods in doc["paths"].items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body:
                found |= {(method, route, f) for f in _walk(body["schema"], defs)}
            for param in op.get("parameters", []):
                assert not any(w in param["name"] for w in FILE_WORDS), (route, param["name"])
    assert found == set(ROUTES)
    for name, schema in defs.items():
        for prop_name, prop in schema.get("properties", {}).items():
            if any(w in prop_name for w in FILE_WORDS) and not name.endswith(("Result", "Error")):
                request_model = name.endswith(("Create", "Request")) or name == "ExternalDisk"
                if request_model:
                    assert "x-thinair-local" in prop, (name, prop_name)


def _escapes(field: str) -> list[str]:
    if field == "libvirt_uri":
        return LIBVIRT_ESCAPES
    if field == "ova":  # an OVA is a tar, not a chain
        return [e for e in URL_ESCAPES if not e.endswith(".qcow2")]
    return URL_ESCAPES if field.endswith("url") else PATH_ESCAPES


CASES = [(key, escape) for key in ROUTES for escape in _escapes(key[2])]


def _check_refusal(setup: Setup, escape: str, status: int, code: str, message: str) -> None:
    assert status == 400, (status, message)
    assert code == "invalid_input", message
    assert "Traceback" not in message
    if escape.startswith("test:"):
        assert "outside the directories the engine serves from" in message, message
    elif escape in LIBVIRT_ESCAPES:
        assert "is not allowed in a host URI" in message, message
    elif escape not in SYNTAX:
        assert "outside the directories the engine serves from" in message, message


@pytest.mark.parametrize(
    ("key", "escape"), CASES, ids=[f"{k[0]} {k[1][7:]} {k[2]} {e}" for k, e in CASES]
)
def test_every_route_refuses_every_escape(
    setup: Setup, unchanged: None, key: tuple[str, str, str], escape: str
) -> None:
    method, route, _field = key
    body = setup.fill(ROUTES[key], setup.escape(escape))
    token = (setup.engine.home / "token").read_text().strip()
    with httpx.Client(base_url=setup.engine.env["THINAIR_URL"], timeout=60) as h:
        r = h.request(method, route, json=body, headers={"Authorization": f"Bearer {token}"})
    answer = r.json()
    _check_refusal(setup, escape, r.status_code, answer["code"], answer["message"])


@pytest.mark.parametrize("key", list(ROUTES), ids=[f"{k[1][7:]} {k[2]}" for k in ROUTES])
def test_no_answer_tells_a_file_exists(setup: Setup, unchanged: None, key: Any) -> None:
    """/etc/shadow and a file that does not exist get the same refusal (the
    probe hole: any token learnt which files exist on the host, and their size)."""
    method, route, _field = key
    token = (setup.engine.home / "token").read_text().strip()
    answers = []
    for path in ("/etc/shadow", "/etc/no-such-file-i19"):
        with httpx.Client(base_url=setup.engine.env["THINAIR_URL"], timeout=60) as h:
            r = h.request(
                method,
                route,
                json=setup.fill(ROUTES[key], path),
                headers={"Authorization": f"Bearer {token}"},
            )
        answers.append((r.status_code, r.text.replace(path, "PATH")))
    assert answers[0] == answers[1]


SDK_CALLS: dict[str, Callable[[Setup, str], object]] = {
    "probe": lambda s, x: s.client.disks.probe(x),
    "vm create": lambda s, x: s.client.vms.create("i19-vm", [x.replace(",", ",,")], memory_mib=64),
    "expose": lambda s, x: s.client.exports.create(x),
    "expose tls-dir": lambda s, x: s.client.exports.create(str(s.image), tls="psk", tls_dir=x),
    "storage add": lambda s, x: s.client.storage_domains.add("i19-sd", x),
}
SDK_CASES = [
    (call, escape)
    for call in SDK_CALLS
    for escape in (URL_ESCAPES if call in ("probe", "vm create") else PATH_ESCAPES)
]


@pytest.mark.parametrize(("call", "escape"), SDK_CASES, ids=[f"{c} {e}" for c, e in SDK_CASES])
def test_sdk(setup: Setup, unchanged: None, call: str, escape: str) -> None:
    with pytest.raises(ThinairAPIError) as e:
        SDK_CALLS[call](setup, setup.escape(escape))
    _check_refusal(setup, escape, e.value.status, e.value.code, e.value.message)


CLI_ESCAPES = [
    "/etc/shadow",
    "{root}/shadow-link.raw",
    "{root}/etc-link/shadow",
    "{root}/evil.qcow2",
]


@pytest.mark.parametrize("escape", CLI_ESCAPES)
@pytest.mark.parametrize(
    "command",
    [["vm", "create", "i19-vm", "--disk"], ["expose"], ["backup", "preview", "--name", "i19-b"]],
    ids=["vm create", "expose", "backup preview"],
)
def test_cli(setup: Setup, unchanged: None, command: list[str], escape: str) -> None:
    result = CliRunner().invoke(
        app, [*command, setup.escape(escape)], env=setup.engine.env, catch_exceptions=True
    )
    assert result.exit_code == 1, result.output
    assert "outside the directories" in result.output, result.output


def test_the_engines_own_files_stay_out() -> None:
    """Even where THINAIR_IMAGE_ROOTS covers THINAIR_HOME, its token and
    database cannot be named as a disk, an image or a storage domain."""
    with module_engine("home") as (engine, base):
        engine.extra_env["THINAIR_IMAGE_ROOTS"] = str(base)
        engine.start()
        c = engine.client()
        home = engine.home
        calls: list[Callable[[str], object]] = [
            lambda p: c.disks.probe(p),
            lambda p: c.vms.create("i19-home", [f"{p},format=raw"], memory_mib=64),
            lambda p: c.exports.create(p, format="raw"),
            lambda p: c.storage_domains.add("i19-home", p),
        ]
        for path in (home / "token", home / "thinair.db", home, home / "console"):
            for call in calls:
                with pytest.raises(ThinairAPIError) as e:
                    call(str(path))
                assert e.value.status == 400 and "THINAIR_HOME" in e.value.message
        assert c.vms.list() == [] and c.exports.list() == []
