"""The engine as a service: one engine per THINAIR_HOME (a second one changes
nothing and names the first), its port taken before anything, and systemd's
readiness notification once it serves."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.engine import VENV_BIN, Engine


def _snapshot(home: Path) -> dict[str, tuple[int, int]]:
    """Every file under the home with its size and modification time."""
    return {
        str(p.relative_to(home)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(home.rglob("*"))
        if p.is_file()
    }


def _run_engine(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "thinair"), "engine"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_second_engine_on_one_home_changes_nothing(
    make_engine: Callable[..., Engine], storage_dir: Path
) -> None:
    first = make_engine("test:///default")
    first.client().storage_domains.add("tmp", str(storage_dir))
    assert first.proc is not None
    time.sleep(0.5)  # let the first engine's start-up writes settle
    before = _snapshot(first.home)
    second = Engine(home=first.home, libvirt_uri="test:///default")
    done = _run_engine(second.env)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"error: THINAIR_HOME {first.home} is in use by the engine pid {first.proc.pid} "
        f"at 127.0.0.1:{first.port}: stop it first, or give this one its own THINAIR_HOME"
    ], done.stderr
    assert "engine ready" not in done.stdout + done.stderr
    assert not _listening(second.port)  # it did not even take its port
    assert _snapshot(first.home) == before  # no migration, no reconcile, no job touched
    assert [d.name for d in first.client().storage_domains.list()] == ["tmp"]


def test_lock_is_freed_when_the_engine_dies(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine("test:///default")
    assert engine.proc is not None
    engine.proc.kill()  # SIGKILL: no clean-up runs
    engine.proc.wait()
    engine.start()  # the kernel freed the lock
    engine.client().health()


def test_taken_port_stops_the_engine_before_its_home(
    make_engine: Callable[..., Engine], workdir: Path
) -> None:
    first = make_engine("test:///default")
    other = Engine(home=workdir / "other", libvirt_uri="test:///default", port=first.port)
    done = _run_engine(other.env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{first.port}: Address already in use"
    ], done.stderr
    assert not (other.home / "thinair.db").exists()  # no migration ran


def test_systemd_readiness(make_engine: Callable[..., Engine], workdir: Path) -> None:
    """With NOTIFY_SOCKET (Type=notify), READY=1 comes once the engine answers."""
    path = workdir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        engine = make_engine("test:///default", start=False, NOTIFY_SOCKET=str(path))
        env = engine.env
        proc = subprocess.Popen(
            [str(VENV_BIN / "thinair"), "engine"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        engine.proc = proc
        assert sock.recv(256) == b"READY=1"
        engine.client().health()  # ready means serving
        engine.stop()
        assert sock.recv(256) == b"STOPPING=1"
    assert os.path.exists(engine.home / "engine.lock")
