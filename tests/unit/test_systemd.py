"""The systemd unit in systemd/: `systemd-analyze verify` accepts it as the
README installs it (ExecStart pointing at the installed `thinair`), silently:
systemd only warns about an unknown value, so any output is a failure."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.support.engine import VENV_BIN

UNIT = ROOT / "systemd" / "thinair-engine.service"


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    return subprocess.run(
        [binary, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )


def _installed(tmp_path: Path, text: str | None = None) -> Path:
    unit = tmp_path / UNIT.name
    text = UNIT.read_text() if text is None else text
    unit.write_text(text.replace("/usr/local/bin/thinair", str(VENV_BIN / "thinair")))
    return unit


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    done = _verify(_installed(tmp_path))
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_verify_would_see_a_mistake(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("Type=notify", "Type=notifyy")
    done = _verify(_installed(tmp_path, broken))
    assert "Failed to parse service type" in done.stdout + done.stderr


def test_unit_is_what_the_engine_does() -> None:
    """Type=notify because the engine sends READY=1 (tests/unit/test_service.py);
    KillMode=process because exports and bridges outlive the engine."""
    lines = set(UNIT.read_text().splitlines())
    assert {"Type=notify", "KillMode=process", "Restart=on-failure"} <= lines
    assert "ExecStart=/usr/local/bin/thinair engine" in lines
