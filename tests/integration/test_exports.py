"""Exports through a real engine, served by real qemu-nbd and nginx and read by
real clients (nbdcopy, nbdinfo, libnbd, qemu-img, curl): the bytes are the
image's, writes are refused, TLS keeps the bytes off the wire and strangers out,
the engine re-adopts its servers after a restart, and nothing is left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest

from tests.conftest import Engine
from tests.support.exports import (
    capture,
    pattern_image,
    pieces_found,
    port_open,
    server_processes,
    stop_servers,
    wait_for,
)
from thinair import models
from thinair.adapters import procfs, qemu_img, qemu_nbd
from thinair.client import ThinairAPIError


@pytest.fixture(autouse=True)
def no_servers_left(workdir: Path) -> Iterator[None]:
    """Export servers outlive engines by design: stop what this test's engines
    started, so a failing test does not leave servers running."""
    yield
    stop_servers(f"{workdir}/")


@pytest.fixture
def engine(test_engine: Engine) -> Engine:
    return test_engine


@pytest.fixture
def image(workdir: Path) -> tuple[Path, bytes]:
    path = workdir / "pattern.raw"
    return path, pattern_image(path)


def expose(engine: Engine, *args: str) -> models.Export:
    done = engine.cli("expose", *args, "--json")
    assert done.returncode == 0, done.stderr
    return models.Export.model_validate_json(done.stdout)


def nbdcopy(url: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nbdcopy", url, str(out)], capture_output=True, text=True, timeout=120, check=False
    )


def nbdinfo(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nbdinfo", "--json", url], capture_output=True, text=True, timeout=30, check=False
    )


def export_dir(engine: Engine, export: models.Export) -> Path:
    return engine.home / "exports" / export.id


def assert_gone(engine: Engine, export: models.Export) -> None:
    """After unexpose: no server, no port, no directory, no record."""
    assert export.pid is not None and procfs.cmdline(export.pid) is None
    assert not server_processes(f"{export_dir(engine, export)}/")
    if export.port:
        assert not port_open(export.port)
    assert not export_dir(engine, export).exists()
    assert export.id not in [e.id for e in engine.client().exports.list()]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_serves_the_image_read_only(
    engine: Engine, image: tuple[Path, bytes], workdir: Path, fmt: str
) -> None:
    path, data = image
    if fmt == "qcow2":
        qcow2 = workdir / "pattern.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(path), str(qcow2)], check=True)
        path = qcow2
    before = path.read_bytes()
    export = expose(engine, str(path))
    assert export.format == fmt and export.virtual_size == len(data)
    assert export.url == f"nbd://127.0.0.1:{export.port}/pattern"
    assert export.state == "running" and export.tls == "none"

    # The bytes served are the image's (the guest's view for qcow2).
    out = workdir / "copy.raw"
    assert nbdcopy(export.url, out).returncode == 0
    assert out.read_bytes() == data
    assert qemu_img.compare(export.url, str(path), a_format="raw", b_format=fmt)

    # Read-only: the server says so, and a write is refused.
    info = json.loads(nbdinfo(export.url).stdout)
    assert info["exports"][0]["is_read_only"] is True
    handle = nbd.NBD()
    handle.connect_uri(export.url)
    with pytest.raises(nbd.Error):
        handle.pwrite(b"x" * 512, 0)
    # The connected client is counted, and what was read.
    listed = engine.client().exports.get(export.name)
    assert listed.clients == 1
    assert listed.bytes_read is not None and listed.bytes_read >= len(data)
    handle.shutdown()
    del handle
    assert path.read_bytes() == before

    # Several readers at once (--shared): a second client is not kept waiting.
    first = nbd.NBD()
    first.connect_uri(export.url)
    assert nbdinfo(export.url).returncode == 0
    first.shutdown()

    done = engine.cli("unexpose", export.name)
    assert done.returncode == 0, done.stderr
    assert_gone(engine, export)


def test_tls_psk(engine: Engine, image: tuple[Path, bytes], workdir: Path) -> None:
    path, data = image
    export = expose(engine, str(path), "--tls", "psk", "--name", "secret")
    assert export.psk_file and export.tls_username == "thinair"
    assert export.url == (
        f"nbds://thinair@127.0.0.1:{export.port}/secret?tls-psk-file={export.psk_file}"
    )
    # The key: 0600 in a 0700 directory, and never on a command line.
    key_file = Path(export.psk_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(export_dir(engine, export).stat().st_mode) == 0o700
    key = key_file.read_text().strip().partition(":")[2]
    assert len(key) == 64
    assert export.pid is not None
    assert key not in " ".join(procfs.cmdline(export.pid) or [])
    assert key not in engine.log()

    # The right key reads the image; no image byte crosses the wire in the clear.
    out = workdir / "copy.raw"
    assert export.port is not None
    with capture(export.port, workdir / "tls.pcap") as pcap:
        assert nbdcopy(export.url, out).returncode == 0
    assert out.read_bytes() == data
    captured = pcap.read_bytes()
    assert len(captured) > len(data)  # the capture did see the transfer
    assert pieces_found(data, captured) == 0

    # The server picks AES-GCM, which the CPU accelerates (see the benchmark).
    debug = subprocess.run(
        ["nbdinfo", export.url],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "LIBNBD_DEBUG": "1"},
        check=True,
    )
    assert "cipher AES-128-GCM" in debug.stderr or "cipher AES-256-GCM" in debug.stderr

    # A plaintext client and a client with the wrong key are refused.
    plain = nbdinfo(f"nbd://127.0.0.1:{export.port}/secret")
    assert plain.returncode != 0 and "export-size" not in plain.stdout
    wrong = workdir / "wrong.psk"
    wrong.write_text(f"thinair:{os.urandom(32).hex()}\n")
    wrong.chmod(0o600)
    bad = nbdinfo(f"nbds://thinair@127.0.0.1:{export.port}/secret?tls-psk-file={wrong}")
    assert bad.returncode != 0

    engine.client().exports.remove(export.id)
    assert_gone(engine, export)
    assert not key_file.exists()


def test_capture_does_find_plaintext(
    engine: Engine, image: tuple[Path, bytes], workdir: Path
) -> None:
    """The control for the TLS test: the same capture of a plain export finds
    the image's bytes, so finding none above means something."""
    path, data = image
    export = expose(engine, str(path))
    assert export.port is not None
    with capture(export.port, workdir / "plain.pcap") as pcap:
        assert nbdcopy(export.url, workdir / "copy.raw").returncode == 0
    assert pieces_found(data, pcap.read_bytes()) > len(data) // 64 // 2


def test_tls_x509(engine: Engine, image: tuple[Path, bytes], workdir: Path) -> None:
    path, data = image
    export = expose(engine, str(path), "--tls", "x509")
    other = expose(engine, str(path), "--tls", "x509")
    assert export.ca_cert and export.tls_certificates and export.port
    client_dir = Path(export.tls_certificates)
    assert sorted(p.name for p in client_dir.iterdir()) == [
        "ca-cert.pem",
        "client-cert.pem",
        "client-key.pem",
    ]
    # The CA's key was thrown away: nobody can sign another certificate.
    assert not list(export_dir(engine, export).rglob("ca-key.pem"))
    for key in (client_dir / "client-key.pem", export_dir(engine, export) / "tls/server-key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600

    out = workdir / "copy.raw"
    assert nbdcopy(export.url, out).returncode == 0
    assert out.read_bytes() == data

    # QEMU's own client (what libvirt uses) with the same directory.
    done = subprocess.run(
        [
            "qemu-img",
            "info",
            "--output=json",
            "--object",
            f"tls-creds-x509,id=tls0,endpoint=client,dir={client_dir}",
            "--image-opts",
            f"driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={export.port},"
            f"file.export={export.name},file.tls-creds=tls0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["virtual-size"] == len(data)

    # Refused: a plaintext client; a client without a certificate; a client
    # holding another export's certificates (another CA).
    base = f"127.0.0.1:{export.port}/{export.name}"
    assert nbdinfo(f"nbd://{base}").returncode != 0
    ca_only = workdir / "ca-only"
    ca_only.mkdir()
    (ca_only / "ca-cert.pem").write_bytes(Path(export.ca_cert).read_bytes())
    assert nbdinfo(f"nbds://{base}?tls-certificates={ca_only}").returncode != 0
    assert nbdinfo(f"nbds://{base}?tls-certificates={other.tls_certificates}").returncode != 0

    for e in (export, other):
        engine.client().exports.remove(e.id)
        assert_gone(engine, e)


def test_unix_socket(engine: Engine, image: tuple[Path, bytes], workdir: Path) -> None:
    path, data = image
    sock = workdir / "export.sock"
    export = expose(engine, str(path), "--unix", str(sock))
    assert export.url == f"nbd+unix:///pattern?socket={sock}"
    handle = nbd.NBD()
    handle.connect_uri(export.url)
    assert handle.pread(4096, 4096) == data[4096:8192]
    assert engine.client().exports.get(export.id).clients == 1
    # Unexpose does not wait for clients to leave.
    engine.client().exports.remove(export.id)
    with pytest.raises(nbd.Error):
        handle.pread(4096, 0)
    assert_gone(engine, export)
    assert not sock.exists()


def test_http(engine: Engine, image: tuple[Path, bytes], workdir: Path) -> None:
    path, data = image
    export = expose(engine, str(path), "--protocol", "http")
    assert export.url == f"http://127.0.0.1:{export.port}/pattern"

    def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["curl", "-s", *args], capture_output=True, timeout=30, check=False)

    # A range request gets 206 and exactly those bytes.
    ranged = curl("-r", "1000-1999", "-w", "%{http_code}", export.url)
    assert ranged.stdout == data[1000:2000] + b"206"
    # QEMU reads it as a disk through its curl driver.
    out = workdir / "copy.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "raw", export.url, str(out)],
        check=True,
        timeout=120,
    )
    assert out.read_bytes() == data
    # Only that file, only reads.
    assert curl("-o", "/dev/null", "-w", "%{http_code}", export.url + "x").stdout == b"404"
    other = f"http://127.0.0.1:{export.port}/etc/passwd"
    assert curl("-o", "/dev/null", "-w", "%{http_code}", other).stdout == b"404"
    put = curl(
        "-X", "PUT", "--data-binary", "x", "-o", "/dev/null", "-w", "%{http_code}", export.url
    )
    assert put.stdout in (b"403", b"405")
    assert path.read_bytes() == data

    engine.client().exports.remove(export.id)
    assert_gone(engine, export)


def test_bad_input_leaves_nothing(engine: Engine, image: tuple[Path, bytes], workdir: Path) -> None:
    path, _ = image
    c = engine.client()
    taken = c.exports.create(str(path), name="taken")
    busy = qemu_nbd.free_port()
    blocker = qemu_nbd.Server(str(path), export_name="x", port=busy)
    blocker.start()
    directory = workdir / "dir"
    directory.mkdir()
    no_keys = workdir / "no-keys"
    no_keys.mkdir()
    cases: list[tuple[dict[str, object], str, str]] = [
        (dict(image=str(workdir / "missing.raw")), "invalid_input", "No such file"),
        (dict(image=str(directory)), "invalid_input", "not a file"),
        (dict(image="relative.raw"), "invalid_input", "absolute"),
        (dict(image=str(path), format="qcow2"), "invalid_input", "qcow2"),
        (dict(image=str(path), listen=f"127.0.0.1:{busy}"), "conflict", "in use"),
        (dict(image=str(path), listen=f"127.0.0.1:{taken.port}"), "conflict", "taken"),
        (dict(image=str(path), name="taken"), "conflict", "taken"),
        (dict(image=str(path), tls="psk", tls_dir=str(no_keys)), "invalid_input", "unreadable"),
        (dict(image=str(path), tls_dir=str(no_keys)), "invalid_input", "--tls"),
        (dict(image=str(path), protocol="http", tls="psk"), "invalid_input", "HTTP"),
        (dict(image=str(path), listen="127.0.0.1:99999"), "invalid_input", "port"),
        (dict(image=str(path), listen="192.0.2.1:10809"), "invalid_input", "cannot listen"),
    ]
    try:
        for kwargs, code, words in cases:
            with pytest.raises(ThinairAPIError) as e:
                c.exports.create(**kwargs)  # type: ignore[arg-type]
            assert e.value.code == code, (kwargs, e.value.message)
            assert words in e.value.message, (kwargs, e.value.message)
            assert "\n" not in e.value.message
    finally:
        blocker.stop()
    # Nothing was started or kept: one record, one server, one directory.
    assert [e.name for e in c.exports.list()] == ["taken"]
    assert list(server_processes(f"{engine.home}/exports/")) == [taken.pid]
    assert [d.name for d in (engine.home / "exports").iterdir()] == [taken.id]
    # The CLI says it in one line on stderr.
    done = engine.cli("expose", str(workdir / "missing.raw"))
    assert done.returncode == 1
    assert done.stderr.strip().startswith("error:") and done.stderr.count("\n") == 1


def test_engine_restart(
    make_engine: Callable[..., Engine],
    image: tuple[Path, bytes],
    nbd_export: Callable[..., qemu_nbd.Server],
) -> None:
    path, data = image
    engine = make_engine("test:///default")
    c = engine.client()
    alive = c.exports.create(str(path), name="alive", tls="psk")
    crashed = c.exports.create(str(path), name="crashed")
    orphan = c.exports.create(str(path), name="orphan")
    web = c.exports.create(str(path), name="web", protocol="http")
    squatted = c.exports.create(str(path), name="squatted")
    foreign = nbd_export(path)  # not thinair's: must be left alone
    neighbour = make_engine("test:///default")  # another THINAIR_HOME's export, too
    next_door = neighbour.client().exports.create(str(path), name="next-door")
    engine.stop(signal.SIGKILL)

    # The exports outlived the engine; two servers then die, something else
    # takes one's port, and one record is lost.
    for e in (alive, crashed, orphan, web, squatted):
        assert e.pid is not None and procfs.cmdline(e.pid) is not None
    for e in (crashed, squatted):
        assert e.pid is not None
        os.kill(e.pid, signal.SIGKILL)
        wait_for(lambda e=e: procfs.gone(e.pid), what=f"{e.name} exit")  # type: ignore[misc]
    assert squatted.port is not None
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def squat() -> bool:
        try:
            squatter.bind(("127.0.0.1", squatted.port or 0))
        except OSError:  # the dead server's socket is not closed yet
            return False
        squatter.listen()
        return True

    wait_for(squat, what="binding the dead export's port")
    with sqlite3.connect(engine.home / "thinair.db") as db:
        db.execute("DELETE FROM exports WHERE name = 'orphan'")

    engine.start()
    after = {e.name: e for e in c.exports.list()}
    assert sorted(after) == ["alive", "crashed", "squatted", "web"]
    # Its port is taken: not served, and the export says why.
    assert after["squatted"].state == "stopped" and after["squatted"].pid is None
    assert "in use" in (after["squatted"].error or "")
    squatter.close()
    # Adopted: the same process still serves the same URL.
    assert after["alive"].pid == alive.pid and after["alive"].url == alive.url
    assert after["web"].pid == web.pid
    # Restarted on the same URL.
    assert after["crashed"].state == "running" and after["crashed"].pid != crashed.pid
    assert after["crashed"].url == crashed.url
    for e in (after["alive"], after["crashed"]):
        out = Path(path.parent / f"{e.name}.out")
        assert nbdcopy(e.url, out).returncode == 0
        assert out.read_bytes() == data
    # The orphan's server and directory are gone; the foreign server is not.
    assert not server_processes(f"{engine.home}/exports/{orphan.id}/")
    assert orphan.port is not None and not port_open(orphan.port)
    assert not (engine.home / "exports" / orphan.id).exists()
    assert nbdinfo(foreign.url).returncode == 0
    assert nbdinfo(next_door.url).returncode == 0
    assert "stopped export process" in engine.log()

    for e in after.values():
        c.exports.remove(e.id)
    assert not server_processes(f"{engine.home}/exports/")
    assert list((engine.home / "exports").iterdir()) == []


def test_tls_credentials_brought_by_the_user(
    engine: Engine, image: tuple[Path, bytes], workdir: Path
) -> None:
    """--tls-dir: keys made with psktool are used, and left alone by unexpose."""
    path, data = image
    mine = workdir / "my-keys"
    mine.mkdir(mode=0o700)
    subprocess.run(
        ["psktool", "-u", "alice", "-p", str(mine / "keys.psk")], check=True, capture_output=True
    )
    export = expose(engine, str(path), "--tls", "psk", "--tls-dir", str(mine))
    assert export.tls_username == "alice" and export.psk_file == str(mine / "keys.psk")
    assert export.url.startswith(f"nbds://alice@127.0.0.1:{export.port}/")
    assert nbdcopy(export.url, workdir / "copy.raw").returncode == 0
    assert (workdir / "copy.raw").read_bytes() == data
    engine.client().exports.remove(export.id)
    assert_gone(engine, export)
    assert (mine / "keys.psk").exists()


def test_bad_vm_disk_exports_leave_nothing(
    engine: Engine, image: tuple[Path, bytes], storage_dir: Path
) -> None:
    path, _ = image
    c = engine.client()
    c.storage_domains.add("tmp", str(storage_dir))
    c.vms.create("v1", disks=[str(path)])  # stopped
    cases: list[tuple[dict[str, object], str, str]] = [
        (dict(vm="nope", disk="vda"), "not_found", "no VM"),
        (dict(vm="v1", disk="vdz"), "not_found", "no disk"),
        (dict(vm="v1", disk="vda"), "conflict", "not running"),
        (dict(vm="v1", image=str(path)), "invalid_input", "either"),
        (dict(), "invalid_input", "either"),
        (dict(image=str(path), disk="vda"), "invalid_input", "--vm"),
        (dict(vm="v1", protocol="http"), "invalid_input", "NBD only"),
    ]
    for kwargs, code, words in cases:
        with pytest.raises(ThinairAPIError) as e:
            c.exports.create(**kwargs)  # type: ignore[arg-type]
        assert e.value.code == code, (kwargs, e.value.message)
        assert words in e.value.message, (kwargs, e.value.message)
    assert c.exports.list() == []
    # The VM was not left held: it starts and is removed as usual.
    c.vms.start("v1")
    c.vms.remove("v1", force=True)
    assert list(storage_dir.iterdir()) == []
