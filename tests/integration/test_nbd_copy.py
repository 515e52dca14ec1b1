"""The import's copier (adapters/nbd_copy) against real servers: it copies only
the allocated data, leaves holes as holes, resumes from a checkpoint without
reading again what it copied, follows the allocation map of a 1 TiB source, and
its digests catch a copy that differs from what it read."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from thinair.adapters import nbd_copy, qemu_img, qemu_nbd

MiB = 2**20


def _image(path: Path, size: int, extents: int, extent: int) -> int:
    """A sparse raw image with `extents` random extents; its allocated bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
        stride = size // extents
        for i in range(extents):
            f.seek(i * stride + 3 * 4096)  # not aligned to a request
            f.write(os.urandom(extent))
    return extents * extent


class _Counted:
    """nbdkit serving an image read-only, counting the bytes its clients read."""

    def __init__(self, image: Path, workdir: Path, pausable: bool = False) -> None:
        self.socket = workdir / "counted.sock"
        self.stats = workdir / "stats.txt"
        self.control = workdir / "pause.sock"  # with `pausable`: nbdkit's pause filter
        # One thread per connection when pausable: with several, nbdkit 1.32
        # answering a held read on a connection the copier has dropped meanwhile
        # failed an assertion (connections.c, raw_send_socket) and exited.
        pause = ["-t", "1", "--filter=pause", f"pause-control={self.control}"] if pausable else []
        self.proc = subprocess.Popen(
            ["nbdkit", "-r", "-f", "--exit-with-parent", "-U", str(self.socket)]
            + ["--filter=stats", *pause[:3], "file", str(image), f"statsfile={self.stats}"]
            + pause[3:],
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.02)
        self.url = f"nbd+unix:///?socket={self.socket}"

    def pause(self, command: bytes) -> None:
        """b"p": every request from now on waits (answers nothing); b"r": they go on."""
        with socket.socket(socket.AF_UNIX) as control:
            control.connect(str(self.control))
            control.sendall(command)

    def stop(self) -> int:
        if self.control.exists():  # requests held by the pause filter keep nbdkit up
            with contextlib.suppress(OSError):
                self.pause(b"r")
        self.proc.terminate()
        self.proc.wait(10)
        text = self.stats.read_text()
        found = re.search(r"^read: \d+ ops, [\d.]+ s, ([\d.]+) (bytes|KiB|MiB|GiB)", text, re.M)
        if not found:
            return 0
        scale = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[found.group(2)]
        return int(float(found.group(1)) * scale)


@pytest.fixture
def counted(workdir: Path) -> Iterator[list[_Counted]]:
    servers: list[_Counted] = []
    yield servers
    for s in servers:
        if s.proc.poll() is None:
            s.stop()


def _stopped_half_way(
    server: _Counted, dest: Path, digests: Path, allocated: int, bandwidth: int
) -> list[nbd_copy.Checkpoint]:
    """A copy stopped once half the data is copied; its checkpoints."""
    checkpoints: list[nbd_copy.Checkpoint] = []
    copied = [0]

    def note(done: int, _total: int) -> None:
        copied[0] = done

    with pytest.raises(nbd_copy.CopyStopped):
        nbd_copy.copy(
            server.url,
            str(dest),
            str(digests),
            bandwidth=bandwidth,
            on_progress=note,
            on_checkpoint=checkpoints.append,
            should_stop=lambda: copied[0] >= allocated // 2,
        )
    return checkpoints


def test_copies_the_data_and_leaves_holes(workdir: Path, counted: list[_Counted]) -> None:
    src = workdir / "src.raw"
    allocated = _image(src, 256 * MiB, 8, 5 * MiB + 123)
    server = _Counted(src, workdir)
    counted.append(server)
    dest = workdir / "dest.raw"
    seen: list[tuple[int, int]] = []
    done = nbd_copy.copy(
        server.url,
        str(dest),
        str(workdir / "digests"),
        on_progress=lambda d, t: seen.append((d, t)),
    )
    read = server.stop()
    assert done.done_to == 256 * MiB and done.copied >= allocated
    assert done.verified == done.digest_bytes  # everything read back and checked
    assert qemu_img.compare(str(src), str(dest), "raw", "raw")
    assert read <= 1.05 * allocated + 8 * 4096, (read, allocated)
    assert os.stat(dest).st_blocks * 512 <= 1.01 * allocated + 8 * 8192
    assert seen[-1] == (done.copied, done.copied)


def test_resumes_from_its_checkpoint(workdir: Path, counted: list[_Counted]) -> None:
    """Stopped half way, then run again from a checkpoint: the copy is whole and
    the source was read about once. The checkpoints on the way are not synced
    (they name this boot), the last is; the first on the way is as good to
    resume from, the host having stayed up (a process killed loses nothing it
    wrote): the copy resumes where the digest file ends."""
    src = workdir / "src.raw"
    allocated = _image(src, 512 * MiB, 16, 8 * MiB)
    server = _Counted(src, workdir)
    counted.append(server)
    dest, digests = workdir / "dest.raw", workdir / "digests"
    *on_the_way, last = _stopped_half_way(server, dest, digests, allocated, 16 * MiB)
    assert on_the_way and {c.boot for c in on_the_way} == {nbd_copy.boot_id()}
    assert last.boot == ""
    # The first of the run is enough: the digest file says how far it went.
    start = on_the_way[0]
    assert 0 < start.copied < last.copied < allocated
    resumed: list[int] = []
    done = nbd_copy.copy(
        server.url,
        str(dest),
        str(digests),
        start=start,
        on_progress=lambda copied, _total: resumed.append(copied),
    )
    assert resumed[0] >= last.copied
    read = server.stop()
    assert done.copied == allocated and done.verified == done.digest_bytes and done.boot == ""
    assert qemu_img.compare(str(src), str(dest), "raw", "raw")
    assert read <= 1.1 * allocated, f"read {read / allocated:.2f}x the allocated bytes"


def test_a_1_tib_source_follows_its_allocation_map(workdir: Path, nbd_export: object) -> None:
    src = workdir / "huge.raw"
    allocated = _image(src, 2**40, 4, MiB)
    server = qemu_nbd.Server(str(src), export_name="huge")
    server.start()
    try:
        began = time.monotonic()
        done = nbd_copy.copy(server.url, str(workdir / "dest.raw"), str(workdir / "d"))
        took = time.monotonic() - began
    finally:
        server.stop()
    assert done.copied == allocated
    assert os.stat(workdir / "dest.raw").st_size == 2**40
    assert os.stat(workdir / "dest.raw").st_blocks * 512 < 16 * MiB
    assert took < 60  # a copy by virtual size would take hours


def test_digests_catch_a_copy_that_differs(workdir: Path, counted: list[_Counted]) -> None:
    src = workdir / "src.raw"
    _image(src, 64 * MiB, 4, 3 * MiB)
    server = _Counted(src, workdir)
    counted.append(server)
    dest, digests = workdir / "dest.raw", workdir / "digests"
    nbd_copy.copy(server.url, str(dest), str(digests))
    assert nbd_copy.verify(str(dest), str(digests)) is None
    bad = 16 * MiB + 3 * 4096 + 1000  # inside the second extent
    with open(dest, "r+b") as f:
        f.seek(bad)
        byte = f.read(1)
        f.seek(bad)
        f.write(bytes([byte[0] ^ 0xFF]))
    mismatch = nbd_copy.verify(str(dest), str(digests))
    assert mismatch is not None and mismatch.offset <= bad < mismatch.offset + mismatch.length
    assert nbd_copy.first_difference(server.url, str(dest), mismatch.offset, mismatch.length) == bad


def test_a_write_that_lands_wrong_fails_the_copy_before_it_counts(
    workdir: Path, counted: list[_Counted], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request's write puts one wrong byte on the disk (a bad buffer, a
    misdirected write): the read-back check fails the copy with that range,
    and no checkpoint ever covers it."""
    src = workdir / "src.raw"
    _image(src, 64 * MiB, 4, 3 * MiB)
    server = _Counted(src, workdir)
    counted.append(server)
    bad = 32 * MiB + 3 * 4096 + 777  # inside the third extent
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if offset <= bad < offset + len(data):
            wrong = bytearray(data)
            wrong[bad - offset] ^= 0x01
            return real_pwrite(fd, wrong, offset)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(nbd_copy.os, "pwrite", pwrite)
    checkpoints: list[nbd_copy.Checkpoint] = []
    with pytest.raises(nbd_copy.CopyMismatch) as caught:
        nbd_copy.copy(
            server.url,
            str(workdir / "dest.raw"),
            str(workdir / "digests"),
            on_checkpoint=checkpoints.append,
        )
    assert caught.value.offset <= bad < caught.value.offset + caught.value.length
    assert all(c.done_to <= caught.value.offset for c in checkpoints)


def test_a_resume_checks_what_an_older_engine_left_unchecked(
    workdir: Path, counted: list[_Counted]
) -> None:
    """A checkpoint whose digests were not all read back (`verified` below
    `digest_bytes`, as an engine that checked later wrote them) over a
    destination that no longer holds what was read: the resume says where."""
    src = workdir / "src.raw"
    allocated = _image(src, 128 * MiB, 8, 4 * MiB)
    server = _Counted(src, workdir)
    counted.append(server)
    dest, digests = workdir / "dest.raw", workdir / "digests"
    last = _stopped_half_way(server, dest, digests, allocated, 32 * MiB)[-1]
    assert last.verified == last.digest_bytes > 0
    bad = 3 * 4096 + 5  # inside the first extent, below any checkpoint
    assert bad < last.done_to
    with open(dest, "r+b") as f:
        f.seek(bad)
        byte = f.read(1)
        f.seek(bad)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(nbd_copy.CopyMismatch) as caught:
        nbd_copy.copy(server.url, str(dest), str(digests), start=replace(last, verified=0))
    assert caught.value.offset <= bad < caught.value.offset + caught.value.length


@pytest.mark.parametrize("lost", ["data", "records"])
def test_a_resume_after_the_host_went_down_keeps_what_reads_back(
    workdir: Path, counted: list[_Counted], lost: str
) -> None:
    """An unsynced checkpoint of another boot (the host went down since): what
    the page cache had not written is lost, data (reads as zeros) or digest
    records (the file cut short, mid-record). The resume keeps the requests
    that read back as recorded, copies again from the first that does not, and
    reads from the source only what it copies again."""
    src = workdir / "src.raw"
    allocated = _image(src, 256 * MiB, 8, 8 * MiB)
    server = _Counted(src, workdir)
    counted.append(server)
    dest, digests = workdir / "dest.raw", workdir / "digests"
    on_the_way = _stopped_half_way(server, dest, digests, allocated, 8 * MiB)[:-1]
    start = replace(on_the_way[-1], boot="a boot before this one")
    records = list(nbd_copy._RECORD.iter_unpack(digests.read_bytes()[: start.digest_bytes]))
    assert len(records) >= 4
    offset, length, _ = records[2]  # the third request: the first two survive
    if lost == "data":
        with open(dest, "r+b") as f:
            f.seek(offset + length // 2)
            f.write(bytes(4096))
    else:
        with open(digests, "r+b") as f:
            f.truncate(2 * nbd_copy._RECORD.size + 7)
    server.stop()  # counted again from zero: a new server
    server.socket.unlink()
    server = _Counted(src, workdir)
    counted.append(server)
    done = nbd_copy.copy(server.url, str(dest), str(digests), start=start)
    read = server.stop()
    assert done.copied == allocated and done.boot == ""
    assert qemu_img.compare(str(src), str(dest), "raw", "raw")
    kept = records[0][1] + records[1][1]
    assert read <= allocated - kept, "what survived was read again"
    assert read >= allocated - kept - length, f"read {read}: the loss was not copied again"


def test_a_source_gone_for_good_fails_with_the_cause(
    workdir: Path, counted: list[_Counted]
) -> None:
    src = workdir / "src.raw"
    _image(src, 128 * MiB, 8, 8 * MiB)
    server = _Counted(src, workdir)
    counted.append(server)

    def kill_server(done: int, _total: int) -> None:
        if done > 16 * MiB and server.proc.poll() is None:
            server.proc.kill()

    _fails_with_a_checkpoint(server, workdir, kill_server, "for 2 s", window=2)


def _fails_with_a_checkpoint(
    server: _Counted,
    workdir: Path,
    on_progress: Callable[[int, int], None],
    match: str,
    window: float,
    stall: float = nbd_copy.STALL,
) -> None:
    """A copy of `server` at 32 MiB/s, with `on_progress` (which takes the
    source away), fails with `match` within 30 s and keeps a checkpoint with
    data in it: what a rerun resumes from."""
    checkpoints: list[nbd_copy.Checkpoint] = []
    began = time.monotonic()
    with pytest.raises(nbd_copy.CopyError, match=match):
        nbd_copy.copy(
            server.url,
            str(workdir / "dest.raw"),
            str(workdir / "digests"),
            bandwidth=32 * MiB,
            on_progress=on_progress,
            on_checkpoint=checkpoints.append,
            window=window,
            stall=stall,
        )
    assert time.monotonic() - began < 30
    assert checkpoints and checkpoints[-1].copied > 0


def _copied_whole(
    server: _Counted,
    src: Path,
    workdir: Path,
    on_progress: Callable[[int, int], None],
    stall: float = nbd_copy.STALL,
) -> None:
    """A copy of `server` at 32 MiB/s, with `on_progress` (which disrupts it
    once) and a window of 30 s, is whole, checked and identical to `src`."""
    dest = workdir / "dest.raw"
    done = nbd_copy.copy(
        server.url,
        str(dest),
        str(workdir / "digests"),
        bandwidth=32 * MiB,
        on_progress=on_progress,
        window=30,
        stall=stall,
    )
    assert done.verified == done.digest_bytes
    assert qemu_img.compare(str(src), str(dest), "raw", "raw")


def test_a_source_that_restarts_is_ridden_out(workdir: Path, counted: list[_Counted]) -> None:
    """The server goes away for 3 s mid-copy and comes back at the same address:
    the copy goes on, whole and identical."""
    src = workdir / "src.raw"
    _image(src, 128 * MiB, 8, 8 * MiB)
    server = _Counted(src, workdir)
    counted.append(server)
    restarted: list[_Counted] = []

    def restart(done: int, _total: int) -> None:
        if done > 16 * MiB and not restarted:
            server.stop()
            server.socket.unlink(missing_ok=True)
            time.sleep(3)
            restarted.append(_Counted(src, workdir))
            counted.append(restarted[0])

    _copied_whole(server, src, workdir, restart)
    assert restarted


def test_a_source_that_stops_answering_is_read_again(
    workdir: Path, counted: list[_Counted], caplog: pytest.LogCaptureFixture
) -> None:
    """The server takes the reads and answers none (as a qemu-nbd whose curl
    driver lost them did here) for 3 s: the copier gives the connection up
    after `stall` seconds, reads again on new ones, and the copy is whole."""
    src = workdir / "src.raw"
    _image(src, 128 * MiB, 8, 8 * MiB)
    server = _Counted(src, workdir, pausable=True)
    counted.append(server)
    paused: list[threading.Timer] = []

    def pause(done: int, _total: int) -> None:
        if done > 16 * MiB and not paused:
            server.pause(b"p")
            paused.append(threading.Timer(3, server.pause, (b"r",)))
            paused[0].start()

    _copied_whole(server, src, workdir, pause, stall=1)
    paused[0].join()
    assert "no reply to" in caplog.text


def test_a_source_that_never_answers_again_fails_the_copy(
    workdir: Path, counted: list[_Counted]
) -> None:
    """No reply for good: the copy fails with the cause once the window is
    over, instead of waiting for ever; what it copied is its checkpoint."""
    src = workdir / "src.raw"
    _image(src, 128 * MiB, 8, 8 * MiB)
    server = _Counted(src, workdir, pausable=True)
    counted.append(server)
    paused: list[bool] = []

    def pause(done: int, _total: int) -> None:
        if done > 16 * MiB and not paused:
            server.pause(b"p")
            paused.append(True)

    _fails_with_a_checkpoint(
        server, workdir, pause, r"no reply to .* \(for 3 s\)", window=3, stall=1
    )
