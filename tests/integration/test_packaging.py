"""Packaging: `thinair --version`, `-h`, Typer's shell completion; a wheel and an
sdist (python -m build) that pip installs in a fresh venv (with
--system-site-packages, for Debian's libvirt and libnbd bindings) into a working
CLI and engine that serves the web UI's files."""

from __future__ import annotations

import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import thinair
from tests.conftest import ROOT
from tests.support.engine import VENV_BIN, Engine


def _thinair(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "thinair"), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_version_and_short_help() -> None:
    assert _thinair("--version").stdout == f"thinair {thinair.__version__}\n"
    assert _thinair("-h").stdout == _thinair("--help").stdout
    sub = _thinair("vm", "create", "-h")
    assert sub.returncode == 0 and "--disk" in sub.stdout


def test_shell_completion() -> None:
    script = _thinair("--show-completion", "bash")
    assert "complete -o default -F _thinair_completion thinair" in script.stdout
    # What bash gets back for `thinair vm st<TAB>`, through that script's protocol.
    done = _thinair(_THINAIR_COMPLETE="complete_bash", COMP_WORDS="thinair vm st", COMP_CWORD="2")
    assert done.stdout.split() == ["start", "stop"]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [str(VENV_BIN / "python"), "-m", "build", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


@pytest.fixture
def fresh_venv(tmp_path: Path) -> Iterator[Path]:
    venv = tmp_path / "venv"
    subprocess.run(
        ["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True
    )
    yield venv


def _install_and_run(venv: Path, package: Path, workdir: Path) -> None:
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(package)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    version = subprocess.run(
        [str(venv / "bin" / "thinair"), "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout == f"thinair {thinair.__version__}\n"
    engine = Engine(home=workdir / "home", libvirt_uri="test:///default")
    engine.home.mkdir(parents=True)
    proc = subprocess.Popen(
        [str(venv / "bin" / "thinair"), "engine"],
        env={**engine.env, "PYTHONPATH": ""},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=workdir,  # not the source tree: the installed package alone
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert engine.client().health().version == thinair.__version__
                break
            except Exception:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        page = httpx.get(f"http://127.0.0.1:{engine.port}/ui/", timeout=10)
        assert page.status_code == 200 and "<script" in page.text
        script = httpx.get(f"http://127.0.0.1:{engine.port}/ui/app.js", timeout=10)
        assert script.status_code == 200
        assert script.text == (ROOT / "thinair" / "web" / "static" / "app.js").read_text()
        assert engine.client().vms.list() == []  # migrations came along
    finally:
        proc.terminate()
        proc.wait(30)


def test_wheel_installs_a_working_engine(dist: Path, fresh_venv: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob("thinair-*.whl")
    _install_and_run(fresh_venv, wheel, tmp_path)


@pytest.mark.slow
def test_sdist_installs_a_working_engine(dist: Path, fresh_venv: Path, tmp_path: Path) -> None:
    (sdist,) = dist.glob("thinair-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    top = sdist.name.removesuffix(".tar.gz")
    assert f"{top}/systemd/thinair-engine.service" in names
    assert f"{top}/ansible/ansible_collections/thinair/virt/plugins/modules/vm.py" in names
    _install_and_run(fresh_venv, sdist, tmp_path)
