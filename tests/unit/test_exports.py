"""Export pieces that need no server: --listen parsing, the URLs clients get,
nginx's configuration, and recognising our processes in /proc."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from thinair.adapters import nginx, procfs
from thinair.config import Settings
from thinair.db.models import Export
from thinair.engine import exports
from thinair.engine.exports import urls
from thinair.errors import InvalidInput


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, ("127.0.0.1", None)),
        ("0.0.0.0:10809", ("0.0.0.0", 10809)),
        ("10.1.2.3", ("10.1.2.3", None)),
        (":10809", ("127.0.0.1", 10809)),
        ("[::1]:10809", ("::1", 10809)),
        ("[::]", ("::", None)),
        ("host.example:1", ("host.example", 1)),
    ],
)
def test_parse_listen(text: str | None, expected: tuple[str, int | None]) -> None:
    assert urls.parse_listen(text) == expected


@pytest.mark.parametrize("text", ["h:0", "h:65536", "h:x", "a b:1", "h;rm:1"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(InvalidInput):
        urls.parse_listen(text)


class _Ctx:
    def __init__(self, home: Path) -> None:
        self.settings = Settings(home=home)


def _export(**fields: object) -> Export:
    base: dict[str, object] = dict(
        id="0f0f0f0f-0000-0000-0000-000000000000",
        name="web1",
        protocol="nbd",
        host="127.0.0.1",
        port=10809,
        socket=None,
        tls="none",
        tls_dir=None,
    )
    base.update(fields)
    return Export(**base)


def test_urls(tmp_path: Path) -> None:
    ctx = _Ctx(tmp_path)
    d = tmp_path / "exports" / "0f0f0f0f-0000-0000-0000-000000000000"
    url = exports.url
    assert url(ctx, _export()) == "nbd://127.0.0.1:10809/web1"  # type: ignore[arg-type]
    assert url(ctx, _export(host="::1")) == "nbd://[::1]:10809/web1"  # type: ignore[arg-type]
    assert (
        url(ctx, _export(tls="psk"))  # type: ignore[arg-type]
        == f"nbds://thinair@127.0.0.1:10809/web1?tls-psk-file={d}/tls/keys.psk"
    )
    assert (
        url(ctx, _export(tls="x509"))  # type: ignore[arg-type]
        == f"nbds://127.0.0.1:10809/web1?tls-certificates={d}/client"
    )
    assert (
        url(ctx, _export(host=None, port=None, socket="/run/s.sock", tls="psk"))  # type: ignore[arg-type]
        == f"nbds+unix://thinair@/web1?socket=/run/s.sock&tls-psk-file={d}/tls/keys.psk"
    )
    assert url(ctx, _export(protocol="http")) == "http://127.0.0.1:10809/web1"  # type: ignore[arg-type]


def test_nginx_config_serves_one_file(tmp_path: Path) -> None:
    conf = nginx.config("/srv/a.raw", "web1", "127.0.0.1", 8080, tmp_path)
    assert "listen 127.0.0.1:8080;" in conf
    assert "location = /web1 {" in conf and 'alias "/srv/a.raw";' in conf
    assert "limit_except GET" in conf and "return 404" in conf
    assert "listen [::1]:8080;" in nginx.config("/srv/a.raw", "x", "::1", 8080, tmp_path)


def test_procfs_recognises_a_process_by_program_and_marker(tmp_path: Path) -> None:
    marker = f"{tmp_path}/exports/x/"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    ours = frozenset({os.path.basename(os.path.realpath(sys.executable))})
    try:
        # Popen returns once the child has exec'd: its command line is there.
        found = procfs.find(ours, marker)
        assert list(found) == [proc.pid]
        assert procfs.matches(proc.pid, ours, marker)
        assert not procfs.matches(proc.pid, frozenset({"qemu-nbd"}), marker)
        assert not procfs.matches(proc.pid, ours, f"{tmp_path}/other/")
        # Not ours any more (another program): never signalled.
        assert not procfs.terminate(proc.pid, frozenset({"qemu-nbd"}), marker)
        assert proc.poll() is None
        assert procfs.terminate(proc.pid, ours, marker)
        proc.wait(5)
        assert procfs.cmdline(proc.pid) is None
    finally:
        proc.kill()
        proc.wait()
    assert procfs.cmdline(os.getpid()) is not None
