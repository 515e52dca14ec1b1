"""Each adapter against the real tool: qemu-img's convert, rebase and commit with
progress and a stop, nbdkit bridges built from every kind of source thinair
reads, NBD addresses that qemu-nbd serves and libnbd opens, and a detached
start that fails with the server's own words."""

from __future__ import annotations

import json
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest

from thinair.adapters import nbd_client, nbdkit, nginx, procfs, qemu_img, qemu_nbd
from thinair.adapters._process import StartFailed, start_detached
from thinair.adapters.errors import AdapterError, CommandFailed
from thinair.adapters.nbd_address import NbdAddress, free_port

MiB = 2**20


def _write(path: Path, fmt: str, fill: int, offset: int, length: int) -> None:
    """Write `fill` bytes through QEMU's block layer (into a qcow2's own clusters)."""
    cmd = f"write -P {fill} {offset} {length}"
    subprocess.run(["qemu-io", "-f", fmt, "-c", cmd, str(path)], check=True, capture_output=True)


def _image(path: Path, size_mib: int, fill: int | None = None, fmt: str = "raw") -> Path:
    qemu_img.create(str(path), fmt, size_mib * MiB)
    if fill is not None:
        _write(path, fmt, fill, 0, size_mib * MiB)
    return path


def _own_data(path: Path) -> int:
    """Bytes of data a qcow2 holds in its own clusters (not its backing's)."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", str(path)], check=True, capture_output=True
    ).stdout
    return sum(e["length"] for e in json.loads(out) if e["depth"] == 0 and e["data"])


def _read(url: str, offset: int, length: int) -> bytes:
    h = nbd_client.connect(url, timeout=10)
    try:
        return bytes(h.pread(length, offset))
    finally:
        h.shutdown()


# -- qemu-img: convert, rebase, commit, with progress and a stop ---------------------


@pytest.fixture
def source(workdir: Path) -> Path:
    """A 64 MiB qcow2 full of data (so a copy takes a while at a limited rate)."""
    return _image(workdir / "source.qcow2", 64, fill=0x5A, fmt="qcow2")


def test_convert_reports_progress_to_the_end(source: Path, workdir: Path) -> None:
    seen: list[float] = []
    dest = workdir / "dest.raw"
    qemu_img.convert(str(source), str(dest), "qcow2", "raw", on_progress=seen.append)
    assert seen and seen == sorted(seen) and seen[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in seen)
    assert qemu_img.compare(str(source), str(dest), "qcow2", "raw")


def test_convert_stops_when_asked(source: Path, workdir: Path) -> None:
    seen: list[float] = []
    dest = workdir / "dest.raw"
    with pytest.raises(qemu_img.Stopped):
        qemu_img.convert(
            str(source),
            str(dest),
            "qcow2",
            "raw",
            bandwidth=4 * MiB,  # 16 s for the whole image: it is stopped long before
            on_progress=seen.append,
            should_stop=lambda: bool(seen),
        )
    assert seen and seen[-1] < 1.0
    assert procfs.find(frozenset({"qemu-img"}), str(dest)) == {}  # terminated, not left


def test_convert_failure_carries_argv_and_stderr(workdir: Path) -> None:
    missing = workdir / "missing.qcow2"
    with pytest.raises(CommandFailed) as e:
        qemu_img.convert(str(missing), str(workdir / "d.raw"), "qcow2", "raw")
    assert isinstance(e.value, AdapterError)
    assert e.value.call == e.value.argv and str(missing) in e.value.argv
    assert "No such file" in e.value.detail and e.value.returncode == 1


def test_rebase_safe_keeps_what_the_image_reads(workdir: Path) -> None:
    old = _image(workdir / "old.raw", 8, fill=0x11)
    new = _image(workdir / "new.raw", 8, fill=0x22)
    top = workdir / "top.qcow2"
    qemu_img.create_overlay(str(top), str(old), "raw", 8 * MiB)
    _write(top, "qcow2", 0x33, 0, MiB)
    before = workdir / "before.raw"
    qemu_img.convert(str(top), str(before), "qcow2", "raw")
    seen: list[float] = []
    qemu_img.rebase(str(top), str(new), "raw", on_progress=seen.append)
    assert qemu_img.info(str(top)).backing_filename == str(new)
    assert qemu_img.compare(str(top), str(before), "qcow2", "raw")  # the old data came along
    assert seen and seen[-1] == 1.0


def test_rebase_unsafe_changes_the_header_only(workdir: Path) -> None:
    old = _image(workdir / "old.raw", 8, fill=0x11)
    new = _image(workdir / "new.raw", 8, fill=0x22)
    top = workdir / "top.qcow2"
    qemu_img.create_overlay(str(top), str(old), "raw", 8 * MiB)
    qemu_img.rebase(str(top), str(new), "raw", unsafe=True)
    assert qemu_img.info(str(top)).backing_filename == str(new)
    assert qemu_img.compare(str(top), str(new), "qcow2", "raw")  # it reads the new one now


@pytest.mark.parametrize("keep", [True, False])
def test_commit_writes_the_top_into_its_backing(workdir: Path, keep: bool) -> None:
    base = _image(workdir / "base.raw", 8, fill=0x11)
    top = workdir / "top.qcow2"
    qemu_img.create_overlay(str(top), str(base), "raw", 8 * MiB)
    _write(top, "qcow2", 0x44, 2 * MiB, MiB)
    seen: list[float] = []
    qemu_img.commit(str(top), on_progress=seen.append, keep=keep)
    assert seen and seen[-1] == 1.0
    with open(base, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(MiB) == b"\x44" * MiB
    # keep (-d) leaves the top's clusters, so a commit can run again; else
    # qemu-img empties the top. Either way it reads what the base holds now.
    assert _own_data(top) == (MiB if keep else 0)
    assert qemu_img.compare(str(top), str(base), "qcow2", "raw")


def test_commit_stops_when_asked(workdir: Path) -> None:
    base = _image(workdir / "base.raw", 64)
    top = workdir / "top.qcow2"
    qemu_img.create_overlay(str(top), str(base), "raw", 64 * MiB)
    _write(top, "qcow2", 0x44, 0, 64 * MiB)
    asked: list[bool] = []

    def stop() -> bool:
        asked.append(True)
        return True

    with pytest.raises(qemu_img.Stopped):
        qemu_img.commit(str(top), should_stop=stop)
    assert asked
    assert procfs.find(frozenset({"qemu-img"}), str(top)) == {}


# -- NBD addresses -------------------------------------------------------------------


def test_nbd_address_urls() -> None:
    assert NbdAddress.tcp("127.0.0.1", 10809, "disk").url() == "nbd://127.0.0.1:10809/disk"
    assert NbdAddress.tcp("::1", 5000).url() == "nbd://[::1]:5000/"
    assert NbdAddress.unix("/run/x.sock").url() == "nbd+unix:///?socket=/run/x.sock"
    assert NbdAddress.unix("/run/x.sock", "d").url() == "nbd+unix:///d?socket=/run/x.sock"
    assert (
        NbdAddress.tcp("h", 1, "d").url(tls=True, user="thinair", query=[("tls-psk-file", "/k")])
        == "nbds://thinair@h:1/d?tls-psk-file=/k"
    )
    assert (
        NbdAddress.unix("/s", "e").url(tls=True, query=[("tls-certificates", "/c")])
        == "nbds+unix:///e?socket=/s&tls-certificates=/c"
    )
    # What would break the URI is percent-encoded; libnbd decodes it.
    assert NbdAddress.unix("/a b/s&t.sock", "x y").url() == (
        "nbd+unix:///x%20y?socket=/a%20b/s%26t.sock"
    )
    with pytest.raises(ValueError):
        NbdAddress()
    with pytest.raises(ValueError):
        NbdAddress(host="h", socket="/s")


@pytest.fixture
def served(
    workdir: Path, nbd_export: Callable[..., qemu_nbd.Server]
) -> Callable[..., qemu_nbd.Server]:
    image = _image(workdir / "served.raw", 4, fill=0x7E)
    return lambda **kw: nbd_export(image, **kw)


@pytest.mark.parametrize("where", ["tcp", "tcp6", "unix"])
def test_nbd_address_opens_what_qemu_nbd_serves(
    served: Callable[..., qemu_nbd.Server], workdir: Path, where: str
) -> None:
    if where == "unix":
        odd = workdir / "a dir&more"
        odd.mkdir()
        server = served(unix_socket=str(odd / "s.sock"))
    else:
        host = "::1" if where == "tcp6" else "127.0.0.1"
        server = served(host=host, port=free_port(host))
    address = server.address
    assert server.url == address.url() and address.export == "disk"
    assert nbd_client.probe(address.url(), timeout=5).size == 4 * MiB
    assert _read(address.url(), MiB, 4096) == b"\x7e" * 4096


def test_free_port_is_free_and_says_why_not() -> None:
    port = free_port()
    assert 0 < port < 65536 and procfs.tcp_clients(port) == 0
    assert free_port("::1") > 0
    with pytest.raises(OSError):
        free_port("192.0.2.1")  # not an address of this machine


# -- nbdkit bridges from each kind of source ---------------------------------------------


@pytest.fixture
def bridge(workdir: Path) -> Iterator[Callable[..., str]]:
    """Start bridges (nbdkit.start) that are stopped after the test; returns the
    bridge's URL."""
    started: list[tuple[Path, Path]] = []

    def start(uri: str, cache: nbdkit.Cache | None = None) -> str:
        socket = workdir / f"bridge{len(started)}.sock"
        pid_file = workdir / f"bridge{len(started)}.pid"
        pid = nbdkit.start(uri, socket, pid_file, window=2, owner=None, cache=cache)
        started.append((socket, pid_file))
        assert nbdkit.running(socket, pid_file) == pid
        return NbdAddress.unix(str(socket)).url()

    yield start
    for socket, pid_file in started:
        nbdkit.stop(socket, pid_file)
        assert not socket.exists() and not pid_file.exists()


def test_nbdkit_argv_for_each_source() -> None:
    retry = ["retries=10", "retry-delay=1", "retry-exponential=no"]
    assert nbdkit.source_args("nbd://h/e", 10) == ["--filter=retry", "nbd", "uri=nbd://h/e", *retry]
    assert nbdkit.source_args("https://h/a.img", 10) == [
        "--filter=retry",
        "curl",
        "url=https://h/a.img",
        *retry,
    ]
    assert nbdkit.source_args("tar+file:///x/a.ova#disk%201.vmdk", 10) == [
        "--filter=tar",
        "file",
        "file=/x/a.ova",
        "tar-entry=disk 1.vmdk",
    ]
    assert nbdkit.source_args("tar+http://h/a.ova#d.vmdk", 10) == [
        "--filter=tar",
        "--filter=retry",
        "curl",
        "url=http://h/a.ova",
        "tar-entry=d.vmdk",
        *retry,
    ]
    # The TLS files go to the plugin's own parameters, never inside the URI.
    assert nbdkit.source_args("nbds://u@h/e?tls-psk-file=/k/psk&x=1", 2) == [
        "--filter=retry",
        "nbd",
        "uri=nbds://u@h/e?x=1",
        "tls-psk=/k/psk",
        "retries=2",
        "retry-delay=1",
        "retry-exponential=no",
    ]
    cache = nbdkit.Cache(block_kib=256, reads_log=Path("/l"), keep=Path("/k"))
    assert nbdkit.source_args("nbd://h/e", 1, cache) == [
        "--filter=cow",
        "--filter=log",
        "--filter=retry",
        "nbd",
        "uri=nbd://h/e",
        "retries=1",
        "retry-delay=1",
        "retry-exponential=no",
        "cow-on-read=/k",
        "cow-block-size=256K",
        "logfile=/l",
    ]


def test_nbdkit_bridges_serve_each_kind_of_source(
    served: Callable[..., qemu_nbd.Server], bridge: Callable[..., str], workdir: Path
) -> None:
    server = served()
    # NBD, plain and with the cache and reads log.
    assert _read(bridge(server.url), 0, 4096) == b"\x7e" * 4096
    log = workdir / "reads.log"
    cached = bridge(server.url, nbdkit.Cache(block_kib=64, reads_log=log))
    assert _read(cached, 2 * MiB, 4096) == b"\x7e" * 4096
    assert log.exists() and "Read" in log.read_text()
    # A member of a tar file, read in place.
    member = _image(workdir / "disk.raw", 1, fill=0x3C)
    ova = workdir / "vm.ova"
    with tarfile.open(ova, "w") as tar:
        tar.add(member, arcname="disk 1.raw")
    assert _read(bridge(f"tar+file://{ova}#disk%201.raw"), 0, 512) == b"\x3c" * 512


def test_nbdkit_bridge_over_http_from_nginx(
    served: Callable[..., qemu_nbd.Server], bridge: Callable[..., str], workdir: Path
) -> None:
    image = _image(workdir / "web.raw", 2, fill=0x42)
    image.chmod(0o644)
    directory = workdir / "nginx"
    directory.mkdir()
    port = free_port()
    (directory / "nginx.conf").write_text(
        nginx.config(str(image), "web.raw", "127.0.0.1", port, directory)
    )
    pid = nginx.start(directory)
    try:
        assert procfs.matches(pid, nginx.PROGRAMS, str(directory) + "/")
        assert _read(bridge(f"http://127.0.0.1:{port}/web.raw"), MiB, 512) == b"\x42" * 512
        # A second nginx on the same port: nginx's own words, and the argv.
        other = workdir / "nginx2"
        other.mkdir()
        (other / "nginx.conf").write_text(
            nginx.config(str(image), "web.raw", "127.0.0.1", port, other)
        )
        with pytest.raises(nginx.ServerError) as e:
            nginx.start(other)
        # nginx tries five times, then says so on its last line.
        assert str(e.value) == "still could not bind()"
        assert "Address already in use" in e.value.detail
        assert isinstance(e.value.__cause__, StartFailed) and e.value.call == nginx.argv(other)
    finally:
        procfs.terminate(pid, nginx.PROGRAMS, str(directory) + "/")


def test_nbdkit_start_failure_says_why(workdir: Path) -> None:
    with pytest.raises(nbdkit.BridgeError) as e:
        nbdkit.start(
            f"tar+file://{workdir}/none.ova#d", workdir / "s.sock", workdir / "s.pid", 1, None
        )
    assert isinstance(e.value, AdapterError) and isinstance(e.value.__cause__, StartFailed)
    assert e.value.call[0].endswith("nbdkit") and "--unix" in e.value.call
    assert str(e.value) == f"error: realpath: {workdir}/none.ova: No such file or directory"
    assert e.value.detail == f"nbdkit: {e.value}"
    assert not (workdir / "s.pid").exists()


# -- starting a server detached ------------------------------------------------------


def test_start_detached_returns_the_servers_pid(workdir: Path) -> None:
    image = _image(workdir / "d.raw", 1, fill=0x01)
    socket, pid_file, log = workdir / "d.sock", workdir / "d.pid", workdir / "d.log"
    pid_file.write_text("1\n")  # stale: removed first, never read
    server = qemu_nbd.Server(str(image), unix_socket=str(socket))
    pid = server.start_detached(str(pid_file), str(log))
    try:
        assert pid != 1 and procfs.matches(pid, frozenset({"qemu-nbd"}), str(socket))
        assert _read(server.url, 0, 512) == b"\x01" * 512
    finally:
        procfs.terminate(pid, frozenset({"qemu-nbd"}), str(socket))


def test_start_detached_failure_keeps_the_servers_words(workdir: Path) -> None:
    missing = workdir / "missing.raw"
    log = workdir / "q.log"
    log.write_text("an older run's line\n")
    server = qemu_nbd.Server(str(missing), unix_socket=str(workdir / "q.sock"))
    with pytest.raises(qemu_nbd.ServerError) as e:
        server.start_detached(str(workdir / "q.pid"), str(log))
    message = str(e.value)
    assert "No such file" in message and not message.startswith("qemu-nbd:")
    assert "older run" not in e.value.detail  # only what this start said
    cause = e.value.__cause__
    assert isinstance(cause, StartFailed) and cause.argv == e.value.call
    # The generic helper, with a tool that exits at once without a word.
    with pytest.raises(StartFailed, match="false exited with 1"):
        start_detached(["false"], workdir / "f.pid")
    with pytest.raises(StartFailed, match="true started but wrote no pid file in 0.2 s"):
        start_detached(["true"], workdir / "t.pid", pid_timeout=0.2)


def test_start_detached_waits_for_a_whole_pid_line(workdir: Path) -> None:
    pid_file = workdir / "late.pid"
    script = f"(sleep 0.3; printf 12 > {pid_file}; sleep 0.3; printf '34\\n' >> {pid_file}) &"
    assert start_detached(["sh", "-c", script], pid_file) == 1234


def test_nbd_probe_error_keeps_its_cause() -> None:
    with pytest.raises(nbd_client.NBDProbeError) as e:
        nbd_client.probe(NbdAddress.tcp("127.0.0.1", free_port()).url(), timeout=2)
    assert isinstance(e.value, AdapterError) and isinstance(e.value.__cause__, nbd.Error)


def test_qemu_nbd_tls_argv_names_a_directory_never_a_key() -> None:
    psk = qemu_nbd.Server("/i.raw", unix_socket="/s", tls=qemu_nbd.Tls("psk", "/k", "NORMAL"))
    x509 = qemu_nbd.Server("/i.raw", port=1, tls=qemu_nbd.Tls("x509", "/c", "NORMAL"))
    assert psk.argv()[-5:] == [
        "--object",
        "tls-creds-psk,id=tls0,endpoint=server,dir=/k,priority=NORMAL",
        "--tls-creds=tls0",
        "--read-only",
        "/i.raw",
    ]
    assert "tls-creds-x509,id=tls0,endpoint=server,dir=/c,priority=NORMAL,verify-peer=on" in (
        x509.argv()
    )
    assert not any("tls" in a for a in qemu_nbd.Server("/i.raw", port=1).argv())
