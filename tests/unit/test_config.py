"""Settings from the environment and the optional TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest

from thinair.config import Settings


def test_environment_overrides(tmp_path: Path) -> None:
    s = Settings.load(
        {
            "THINAIR_HOME": str(tmp_path),
            "THINAIR_LISTEN": "127.0.0.1:9999",
            "THINAIR_PROBE_TIMEOUT": "2.5",
            "THINAIR_MIN_FREE_MIB": "7",
        }
    )
    assert s.home == tmp_path
    assert s.url == "http://127.0.0.1:9999"
    assert s.listen_port == 9999
    assert s.probe_timeout == 2.5
    assert s.min_free_mib == 7
    assert s.db_url == f"sqlite:///{tmp_path}/thinair.db"
    assert s.libvirt_uri == "qemu:///system"


def test_config_file_then_environment(tmp_path: Path) -> None:
    conf = tmp_path / "thinair.toml"
    conf.write_text('libvirt_uri = "test:///default"\nstop_timeout = 5\n')
    s = Settings.load({"THINAIR_CONFIG": str(conf), "THINAIR_STOP_TIMEOUT": "9"})
    assert s.libvirt_uri == "test:///default"
    assert s.stop_timeout == 9.0


def test_unknown_setting_in_file_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "thinair.toml"
    conf.write_text('colour = "blue"\n')
    with pytest.raises(ValueError, match="colour"):
        Settings.load({"THINAIR_CONFIG": str(conf)})


def test_on_off_settings() -> None:
    assert Settings.load({"THINAIR_COPY_ON_READ": "on"}).copy_on_read is True
    assert Settings.load({"THINAIR_COPY_ON_READ": "0"}).copy_on_read is False
    with pytest.raises(ValueError, match="not on or off"):
        Settings.load({"THINAIR_COPY_ON_READ": "maybe"})


def test_the_prefetch_is_on_by_default() -> None:
    assert Settings.load({}).bridge_prefetch
    assert not Settings.load({"THINAIR_BRIDGE_PREFETCH": "off"}).bridge_prefetch


def test_readahead_size_is_checked() -> None:
    assert Settings.load({"THINAIR_BRIDGE_READAHEAD_MAX_MIB": "8"}).bridge_readahead_max_mib == 8
    for bad in ("0", "1025"):
        with pytest.raises(ValueError, match="between 1 and 1024"):
            Settings.load({"THINAIR_BRIDGE_READAHEAD_MAX_MIB": bad})
