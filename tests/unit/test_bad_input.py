"""A corpus of malformed and hostile inputs, each through the REST API, the SDK and
the CLI: every one must get a clear 4xx (or a non-zero exit with one error line),
never a 5xx or a traceback, and must change nothing the engine owns.

One engine on libvirt's test driver serves the whole module; after every case the
engine's state (VMs, storage domains, exports, tokens, jobs) and the files in its
storage domain are compared with what they were before."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import TEST_ROOT
from tests.support.engine import Engine
from thinair.cli import app
from thinair.client import Client, ThinairAPIError
from thinair.errors import ThinairError

LONG = "a" * 5000

# External disk locations: odd schemes, paths outside the image roots, shell and
# XML metacharacters, unicode, traversal, broken syntax.
BAD_URLS = [
    "gopher://host/disk",
    "javascript:alert(1)",
    "data:application/octet-stream;base64,AAAA",
    "ldap://host/dc=x",
    "smb://host/share/disk.img",
    "iscsi://host/iqn.2020-01.x:disk/0",
    "rbd:pool/image",
    "gluster://host/vol/disk",
    "vnc://host:5900",
    "sheepdog://host/disk",
    "nfs://host/export/disk.img",
    "tftp://host/disk.img",
    "telnet://host",
    "unix:///run/libvirt/libvirt-sock",
    "mailto:root@localhost",
    "nbd:",
    "nbd://",
    "nbd:///",
    "nbd://:10809/disk",
    "nbd://host:99999/disk",
    "nbd://host:-1/disk",
    "nbd://host:0/disk",
    "nbd://host:port/disk",
    "nbd://host/disk?x=1",
    "nbd://host/disk#frag",
    "nbd+unix:///disk",
    "nbd+unix://host/disk?socket=/tmp/s",
    "nbd+unix:///disk?socket=relative",
    "nbd+unix:///disk?socket=/a&socket=/b",
    "nbds://host/disk?tls-psk-file=keys.psk",
    "nbds://host/disk?tls-psk-file=/etc/shadow",
    "nbds://host/disk?tls-certificates=/root",
    "nbds://host/disk?evil=1",
    "http://",
    "http:///disk.img",
    "http://host",
    "http://host/",
    "https://host:70000/disk.img",
    "ssh://host",
    "ssh://host/",
    "ftp://host/",
    "/etc/passwd",
    "/etc/shadow",
    "/root/.ssh/id_rsa",
    "/proc/self/environ",
    "/proc/kcore",
    "/dev/mem",
    "/dev/sda",
    "/sys/kernel/notes",
    "file:///etc/passwd",
    "file://localhost/etc/shadow",
    "file:///var/tmp/thinair-tests/../../etc/passwd",
    "/var/tmp/thinair-tests/../../etc/passwd",
    "/var/tmp/thinair-tests/./x/../../../etc/shadow",
    "//etc/passwd",
    "/var/tmp/thinair-tests/no-such-image.raw",
    "/var/tmp/thinair-tests",
    "relative/disk.img",
    "~root/disk.img",
    "disk.img; rm -rf /",
    "nbd://host/disk;reboot",
    "nbd://host/$(reboot)",
    "nbd://host/`id`",
    "nbd://host/disk|cat /etc/shadow",
    "nbd://host/disk && halt",
    "nbd://host/disk\nhalt",
    "nbd://host/disk\rx",
    "nbd://host/disk\x00x",
    "nbd://host/disk\tx",
    "nbd://host/a b",
    "/var/tmp/a b.img",
    "/var/tmp/$(id).img",
    "/var/tmp/x'y.img",
    'nbd://host/"quoted"',
    "nbd://host/<disk>",
    "nbd://host/a&b",
    "nbd://host/]]></source><source file='/etc/shadow'/>",
    "http://host/<script>alert(1)</script>",
    "nbd://höst/disk",
    "nbd://host/диск",
    "nbd://host/disk\u202e",
    "nbd://host/\U0001f4a3",
    "nbd://" + LONG,
    "/" + LONG,
    "http://[::1/disk.img",
    "http://user:pass@/disk.img",
    "ssh://host:22:22/disk",
]

# Disk options beside the URL, for the CLI and SDK option syntax.
BAD_DISK_OPTIONS = [
    "nbd://host/disk,format=evil",
    "nbd://host/disk,format=",
    "nbd://host/disk,format=raw,format=qcow2",
    "nbd://host/disk,storage=../x",
    "nbd://host/disk,storage=nope",
    "nbd://host/disk,check-readonly=maybe",
    "nbd://host/disk,unknown=1",
    "nbd://host/disk,",
    "nbd://host/disk,format",
    ",format=raw",
    "nbd://host/disk,format=raw;id",
]

# Blank disks: the disk entry of a create request (REST), and the same as a
# `--disk size=...` option where the option syntax can say it (SDK and CLI).
BAD_BLANKS: list[tuple[dict[str, Any], str | None]] = [
    ({"blank": {"virtual_size": 0}}, "size=0"),
    ({"blank": {"virtual_size": -1}}, "size=-1"),
    ({"blank": {"virtual_size": -(2**63)}}, "size=-8E"),
    ({"blank": {"virtual_size": 512}}, "size=512K,,0"),
    ({"blank": {"virtual_size": 2**20 - 512}}, "size=0.0001"),
    ({"blank": {"virtual_size": 2**20 + 1}}, "size=1K"),
    ({"blank": {"virtual_size": 2**63}}, "size=8388608T"),
    ({"blank": {"virtual_size": 10**30}}, "size=1000000000000000000000"),
    ({"blank": {"virtual_size": 65 * 2**40}}, "size=65T"),
    ({"blank": {"virtual_size": 60 * 2**40}}, "size=60T"),  # fits no domain here
    ({"blank": {"virtual_size": 1.5e9}}, "size=1.5e9"),
    ({"blank": {"virtual_size": "10G"}}, "size=10X"),
    ({"blank": {"virtual_size": "1073741824"}}, "size="),
    ({"blank": {"virtual_size": True}}, "size=true"),
    ({"blank": {"virtual_size": None}}, "size=none"),
    ({"blank": {"virtual_size": []}}, "size=nan"),
    ({"blank": {"virtual_size": "Infinity"}}, "size=inf"),
    ({"blank": {}}, "size"),
    ({"blank": 10}, "size=1 G"),
    ({"blank": "10G"}, "size=1G,size=2G"),
    ({"blank": {"virtual_size": 2**30, "extra": 1}}, "size=1G,format=raw"),
    ({"blank": {"virtual_size": 2**30}, "storage_domain": "nope"}, "size=1G,storage=nope"),
    ({"blank": {"virtual_size": 2**30}, "storage_domain": "../sd"}, "size=1G,storage=../sd"),
    ({"blank": {"virtual_size": 2**30}, "storage_domain": ""}, "size=1G,storage="),
    ({"blank": {"virtual_size": 2**30}, "external_disk": {"url": "{image}"}}, "size=1G,"),
    ({"blank": None}, "size=1G;reboot"),
    ({"blank": {"virtual_size": 2**30, "url": "{image}"}}, "size=$(id)"),
]

BAD_NAMES = [
    "",
    " ",
    "-rf",
    ".",
    "..",
    "../etc",
    "a/b",
    "a\\b",
    "a b",
    "x\n",
    "x\ny",
    "x\x00y",
    "<script>",
    "x&y",
    "x'y",
    'x"y',
    "$(id)",
    "`id`",
    "a;b",
    "a|b",
    "naïve",
    "名前",
    "\u202eevil",
    "a" * 65,
    "_lead",
    ".hidden",
    "%2e%2e",
    "a:b",
]

BAD_NUMBERS: list[Any] = [
    -1,
    0,
    15,
    2**63,
    -(2**63),
    10**30,
    1.5,
    "abc",
    "",
    None,
    True,
    [],
    {},
    "1e9",
    "Infinity",
]

BAD_IMPORTS: list[dict[str, Any]] = [
    {},
    {"to": ""},
    {"to": "nope"},
    {"to": "../sd"},
    {"to": "sd", "strategy": "teleport"},
    {"to": "sd", "strategy": ""},
    {"to": "sd", "strategy": 1},
    {"to": "sd", "bandwidth_mib": -1},
    {"to": "sd", "bandwidth_mib": 0},
    {"to": "sd", "bandwidth_mib": "fast"},
    {"to": "sd", "bandwidth_mib": 1e308},
    {"to": "sd", "bandwidth_mib": 10**30},
    {"to": "sd", "extra": 1},
    {"to": ["sd"]},
    {"to": None},
]

BAD_EXPOSES: list[dict[str, Any]] = [
    {},
    {"image": ""},
    {"image": "relative.img"},
    {"image": "/etc/passwd"},
    {"image": "/etc/shadow"},
    {"image": "/root/.ssh/id_rsa"},
    {"image": "/proc/kcore"},
    {"image": "/dev/mem"},
    {"image": "/var/tmp/thinair-tests/../../etc/shadow"},
    {"image": "/var/tmp/a b.img"},
    {"image": "/var/tmp/$(id)"},
    {"image": "/var/tmp/x;reboot"},
    {"image": "/" + LONG},
    {"image": "{image}", "format": "evil"},
    {"image": "{image}", "format": "qcow2"},
    {"image": "{image}", "protocol": "gopher"},
    {"image": "{image}", "tls": "weird"},
    {"image": "{image}", "tls": "psk", "protocol": "http"},
    {"image": "{image}", "listen": "h;rm:1"},
    {"image": "{image}", "listen": "127.0.0.1:0"},
    {"image": "{image}", "listen": "127.0.0.1:65536"},
    {"image": "{image}", "listen": "127.0.0.1:x"},
    {"image": "{image}", "listen": "a b:1"},
    {"image": "{image}", "unix": "relative.sock"},
    {"image": "{image}", "unix": "/var/tmp/a b.sock"},
    {"image": "{image}", "listen": "127.0.0.1:1", "unix": "/var/tmp/x.sock"},
    {"image": "{image}", "tls_dir": "/var/tmp"},
    {"image": "{image}", "tls": "psk", "tls_dir": "/etc"},
    {"image": "{image}", "shared": 0},
    {"image": "{image}", "shared": -5},
    {"image": "{image}", "shared": 10**12},
    {"image": "{image}", "name": "../x"},
    {"image": "{image}", "name": "<x>"},
    {"image": "{image}", "vm": "taken"},
    {"vm": "nope", "disk": "vda"},
    {"vm": "taken", "disk": "vdz"},
    {"disk": "vda"},
]

BAD_STORAGE: list[tuple[str, str]] = [
    ("ok-name", ""),
    ("ok-name", "relative/dir"),
    ("ok-name", "/no/such/directory"),
    ("ok-name", "/etc/passwd"),
    ("ok-name", "{sd}"),
    ("ok-name", "{sd}/sub"),
    ("sd", "{other}"),
    ("ok-name", "/" + LONG),
    ("ok-name", "/var/tmp/a\x00b"),
    ("ok-name", "/proc/self"),
]

# Request bodies of the wrong shape, for the REST API only.
BAD_BODIES: list[tuple[str, str, bytes]] = [
    ("POST", "/vms", b""),
    ("POST", "/vms", b"{"),
    ("POST", "/vms", b"null"),
    ("POST", "/vms", b"[]"),
    ("POST", "/vms", b'"vm"'),
    ("POST", "/vms", b"42"),
    ("POST", "/vms", b"\xff\xfe\x00"),
    ("POST", "/vms", b'{"name": 1, "disks": []}'),
    ("POST", "/vms", b'{"name": "n", "disks": "nbd://h/x"}'),
    ("POST", "/vms", b'{"name": "n", "disks": []}'),
    ("POST", "/vms", b'{"name": "n", "disks": [{}]}'),
    ("POST", "/vms", b'{"name": "n", "disks": [{"external_disk": 5}]}'),
    ("POST", "/vms", b'{"name": "n", "disks": [{"external_disk": {"url": null}}]}'),
    ("POST", "/vms", b'{"name": "n", "disks": [{"external_disk": {"url": "x", "tls": "psk"}}]}'),
    (
        "POST",
        "/vms",
        b'{"name": "n", "disks": ['
        + b'{"external_disk": {"url": "/x"}},' * 26
        + b'{"external_disk": {"url": "/x"}}]}',
    ),
    ("POST", "/vms", b'{"name": "n", "cpus": 1e400, "disks": [{"external_disk": {"url": "/x"}}]}'),
    ("POST", "/vms", b"[" * 10000 + b"]" * 10000),
    ("POST", "/vms", b'{"name": "n", "name": "m"}'),
    ("POST", "/storage_domains", b'{"name": "x"}'),
    ("POST", "/storage_domains", b'{"path": "/tmp"}'),
    ("POST", "/storage_domains", b'{"name": ["x"], "path": "/tmp"}'),
    ("POST", "/tokens", b'{"name": "t", "read_only": "maybe"}'),
    ("POST", "/tokens", b'{"name": "t", "admin": true}'),
    ("POST", "/exports", b'{"image": 5}'),
    ("POST", "/exports", b"[]"),
    ("POST", "/vms/taken/import", b"[]"),
    ("POST", "/vms/taken/import", b'{"to": {"$ne": null}}'),
    ("POST", "/vms/taken/stop", b'{"timeout": -1}'),
    ("POST", "/vms/taken/stop", b'{"force": "yes please"}'),
    ("POST", "/disks/nope/move", b'{"to": "sd"}'),
    ("GET", "/vms/taken/console?offset=-1", b""),
    ("GET", "/vms/taken/console?offset=abc", b""),
    ("GET", "/jobs/nope?wait=-1", b""),
    ("GET", "/vms/%00", b""),
    ("GET", "/vms/" + "a" * 5000, b""),
    ("GET", "/vms/..%2f..%2fetc%2fpasswd", b""),
    ("POST", "/vms/nope/start", b""),
    ("POST", "/vms/nope/rollback", b""),
    ("DELETE", "/vms/nope", b""),
    ("DELETE", "/storage_domains/nope", b""),
    ("DELETE", "/exports/nope", b""),
    ("DELETE", "/tokens/nope", b""),
    ("POST", "/jobs/nope/cancel", b""),
    ("PUT", "/vms/taken", b"{}"),
    ("PATCH", "/vms/taken", b'{"memory_mib": 1}'),
]


@dataclass
class Setup:
    engine: Engine
    client: Client
    image: Path
    sd: Path
    other: Path

    def fill(self, value: Any) -> Any:
        if isinstance(value, str):
            return (
                value.replace("{image}", str(self.image))
                .replace("{sd}", str(self.sd))
                .replace("{other}", str(self.other))
            )
        if isinstance(value, dict):
            return {k: self.fill(v) for k, v in value.items()}
        return value

    def state(self) -> dict[str, Any]:
        c = self.client
        return {
            "vms": sorted((v.name, v.phase, v.state) for v in c.vms.list()),
            "storage": sorted(d.name for d in c.storage_domains.list()),
            "exports": sorted(e.name for e in c.exports.list()),
            "tokens": sorted((t.name, t.revoked_at is None) for t in c.tokens.list()),
            "jobs": sorted(j.id for j in c.jobs.list()),
            "files": sorted(str(p) for p in self.sd.rglob("*")),
            "home": sorted(
                str(p)
                for p in self.engine.home.rglob("*")
                if not p.name.startswith("thinair.db") and p.suffix != ".log"
            ),
        }


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    TEST_ROOT.mkdir(mode=0o755, exist_ok=True)
    root = TEST_ROOT / f"corpus-{uuid.uuid4().hex[:8]}"
    root.mkdir(mode=0o755)
    sd, other = root / "sd", root / "other"
    sd.mkdir(mode=0o755)
    other.mkdir(mode=0o755)
    image = root / "image.raw"
    with open(image, "wb") as f:
        f.truncate(16 * 2**20)
    engine = Engine(home=root / "home", libvirt_uri="test:///default")
    engine.start()
    client = engine.client()
    client.storage_domains.add("sd", str(sd))
    client.vms.create("taken", disks=[str(image)], memory_mib=64)
    client.tokens.create("taken")
    try:
        yield Setup(engine, client, image, sd, other)
    finally:
        for export in client.exports.list():  # should there be any, stop its server
            client.exports.remove(export.id)
        engine.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def unchanged(setup: Setup) -> Iterator[None]:
    before = setup.state()
    yield
    assert setup.state() == before, "a refused request changed the engine's state"


def _assert_4xx(r: httpx.Response) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"code", "message"}, body
    assert body["message"] and "Traceback" not in body["message"], body


def _refused(call: Callable[[], object]) -> ThinairAPIError | ThinairError:
    """The SDK must raise its own error type with a 4xx status, nothing else."""
    try:
        call()
    except ThinairAPIError as e:
        assert 400 <= e.status < 500, (e.status, e.message)
        assert e.message and "Traceback" not in e.message
        return e
    except ThinairError as e:
        return e
    raise AssertionError("the SDK accepted a bad input")


def _cli(setup: Setup, *args: str) -> None:
    env = {**setup.engine.env}
    result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=True)
    assert result.exit_code in (1, 2), (args, result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), (args, result.exception)
    text = result.output
    assert "Traceback" not in text, text
    assert "error" in text.lower() or "usage" in text.lower(), text


def _api(setup: Setup, method: str, path: str, **kwargs: Any) -> None:
    headers = {"Authorization": f"Bearer {_token(setup)}", **kwargs.pop("headers", {})}
    with httpx.Client(base_url=f"{setup.engine.env['THINAIR_URL']}/api/v1", timeout=60) as h:
        _assert_4xx(h.request(method, path, headers=headers, **kwargs))


def _token(setup: Setup) -> str:
    return (Path(setup.engine.home) / "token").read_text().strip()


# -- VM create: URLs, disk options, names, sizes ---------------------------------

CREATE_CASES: list[tuple[str, Any, Any, Any]] = (
    [(f"url {u!r}"[:60], "vm1", u, {}) for u in BAD_URLS]
    + [(f"name {n!r}"[:60], n, "{image}", {}) for n in BAD_NAMES]
    + [("name taken", "taken", "{image}", {})]
    + [(f"memory {v!r}", "vm1", "{image}", {"memory_mib": v}) for v in BAD_NUMBERS]
    + [
        (f"cpus {v!r}", "vm1", "{image}", {"cpus": v})
        for v in [*BAD_NUMBERS[:2], *BAD_NUMBERS[3:], 65, 10**6]
    ]
)


@pytest.mark.parametrize(
    ("case", "name", "url", "extra"), CREATE_CASES, ids=[c[0] for c in CREATE_CASES]
)
def test_vm_create_api(
    setup: Setup, unchanged: None, case: str, name: Any, url: Any, extra: Any
) -> None:
    body = {"name": name, "disks": [{"external_disk": {"url": setup.fill(url)}}], **extra}
    _api(setup, "POST", "/vms", json=body)


@pytest.mark.parametrize(
    ("case", "name", "url", "extra"), CREATE_CASES, ids=[c[0] for c in CREATE_CASES]
)
def test_vm_create_sdk(
    setup: Setup, unchanged: None, case: str, name: Any, url: Any, extra: Any
) -> None:
    if None in extra.values():
        pytest.skip("the SDK takes None as 'not given': the engine's default applies")
    _refused(lambda: setup.client.vms.create(name, [setup.fill(url).replace(",", ",,")], **extra))


CLI_CREATE = [c for c in CREATE_CASES if all(isinstance(v, (int, str)) for v in c[3].values())]


@pytest.mark.parametrize(
    ("case", "name", "url", "extra"), CLI_CREATE, ids=[c[0] for c in CLI_CREATE]
)
def test_vm_create_cli(
    setup: Setup, unchanged: None, case: str, name: Any, url: Any, extra: Any
) -> None:
    if "\x00" in name + url:
        pytest.skip("a NUL cannot be passed in a command-line argument")
    args = ["vm", "create", name, "--disk", setup.fill(url).replace(",", ",,")]
    for key, value in extra.items():
        args += [f"--{key.split('_')[0]}", str(value)]
    _cli(setup, *args)


@pytest.mark.parametrize("option", BAD_DISK_OPTIONS)
def test_disk_options(setup: Setup, unchanged: None, option: str) -> None:
    _refused(lambda: setup.client.vms.create("vm1", [option]))
    _cli(setup, "vm", "create", "vm1", "--disk", option)


@pytest.mark.parametrize(("disk", "option"), BAD_BLANKS, ids=[repr(b)[:60] for b in BAD_BLANKS])
def test_blank_disks(
    setup: Setup, unchanged: None, disk: dict[str, Any], option: str | None
) -> None:
    """A blank disk of a bad size (zero, negative, huge, not in sectors, not a
    number, bigger than the domain's free space) or with a bad option: refused,
    beside a good external boot disk, and nothing is made."""
    boot = {"external_disk": {"url": str(setup.image)}}
    _api(setup, "POST", "/vms", json={"name": "vm1", "disks": [boot, setup.fill(disk)]})
    if option is not None:
        _refused(lambda: setup.client.vms.create("vm1", [str(setup.image), option]))
        _cli(setup, "vm", "create", "vm1", "--disk", str(setup.image), "--disk", option)


# -- other operations ----------------------------------------------------------


@pytest.mark.parametrize("body", BAD_IMPORTS, ids=[repr(b)[:50] for b in BAD_IMPORTS])
def test_import(setup: Setup, unchanged: None, body: dict[str, Any]) -> None:
    _api(setup, "POST", "/vms/taken/import", json=body)
    if isinstance(body.get("to"), str) and set(body) <= {"to", "strategy", "bandwidth_mib"}:
        _refused(
            lambda: setup.client.vms.import_(
                "taken", body["to"], body.get("strategy"), body.get("bandwidth_mib")
            )
        )
        args = ["vm", "import", "taken", "--to", body["to"], "--no-wait"]
        if body.get("strategy") is not None:
            args += ["--strategy", str(body["strategy"])]
        if body.get("bandwidth_mib") is not None:
            args += ["--bandwidth", str(body["bandwidth_mib"])]
        _cli(setup, *args)


@pytest.mark.parametrize("body", BAD_EXPOSES, ids=[repr(b)[:50] for b in BAD_EXPOSES])
def test_expose(setup: Setup, unchanged: None, body: dict[str, Any]) -> None:
    body = setup.fill(body)
    _api(setup, "POST", "/exports", json=body)
    _refused(lambda: setup.client.exports.create(**body))
    if "\x00" in str(body) or not body.get("unix", "/").startswith("/"):
        return  # the CLI takes a relative path as relative to where the user stands
    args = ["expose"] + ([body["image"]] if body.get("image") else [])
    for key, value in body.items():
        if key != "image":
            args += [f"--{key.replace('_', '-')}", str(value)]
    _cli(setup, *args)


@pytest.mark.parametrize(("name", "path"), BAD_STORAGE + [(n, "{other}") for n in BAD_NAMES])
def test_storage_add(setup: Setup, unchanged: None, name: str, path: str) -> None:
    path = setup.fill(path)
    _api(setup, "POST", "/storage_domains", json={"name": name, "path": path})
    _refused(lambda: setup.client.storage_domains.add(name, path))
    if "\x00" not in name + path:
        _cli(setup, "storage", "add", name, path)


@pytest.mark.parametrize("name", [*BAD_NAMES, "taken"])
def test_token_create(setup: Setup, unchanged: None, name: str) -> None:
    _api(setup, "POST", "/tokens", json={"name": name})
    _refused(lambda: setup.client.tokens.create(name))
    if "\x00" not in name:
        _cli(setup, "token", "create", name)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    BAD_BODIES,
    ids=[f"{m} {p[:30]} {b[:30]!r}" for m, p, b in BAD_BODIES],
)
def test_wrong_shapes(setup: Setup, unchanged: None, method: str, path: str, body: bytes) -> None:
    _api(
        setup,
        method,
        path,
        content=body,
        headers={"Content-Type": "application/json"} if body else {},
    )


@pytest.mark.parametrize(
    "ref", ["nope", "../taken", "taken/../nope", "%00", "a" * 300, "名前", "<x>", "taken;reboot"]
)
def test_unknown_references(setup: Setup, unchanged: None, ref: str) -> None:
    for call in (
        setup.client.vms.start,
        setup.client.vms.rollback,
        setup.client.vms.get,
        setup.client.storage_domains.remove,
        setup.client.exports.remove,
        setup.client.tokens.revoke,
        setup.client.jobs.cancel,
    ):
        _refused(lambda call=call: call(ref))  # type: ignore[misc]
    for args in (
        ["vm", "start", ref],
        ["vm", "rollback", ref],
        ["vm", "show", ref],
        ["storage", "remove", ref],
        ["unexpose", ref],
        ["jobs", "cancel", ref],
    ):
        _cli(setup, *args)


def test_symlink_out_of_the_roots(setup: Setup, unchanged: None) -> None:
    link = setup.sd.parent / "passwd.raw"
    os.symlink("/etc/shadow", link)
    try:
        _api(setup, "POST", "/exports", json={"image": str(link), "format": "raw"})
        _api(
            setup,
            "POST",
            "/vms",
            json={"name": "vm1", "disks": [{"external_disk": {"url": str(link)}}]},
        )
    finally:
        link.unlink()


def test_corpus_size() -> None:
    """The issue asks for at least 200 distinct inputs."""
    inputs = (
        len(BAD_URLS)
        + len(BAD_DISK_OPTIONS)
        + len(BAD_NAMES)
        + len(BAD_NUMBERS)
        + len(BAD_IMPORTS)
        + len(BAD_EXPOSES)
        + len(BAD_STORAGE)
        + len(BAD_BODIES)
        + len(BAD_BLANKS)
    )
    assert inputs >= 200, inputs
