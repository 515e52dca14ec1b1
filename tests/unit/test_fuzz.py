"""Fuzz the whole API from its OpenAPI document with schemathesis: no request
may get a server error. The engine (on libvirt's test driver) and the fuzzer run
inside a new network namespace with only loopback, so fuzzed disk URLs naming
random hosts cannot send anything off the machine."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from thinair.adapters.qemu_nbd import free_port

VENV_BIN = Path(sys.executable).parent

SCRIPT = r"""
set -eu
ip link set lo up
export THINAIR_HOME="$WORK/home" THINAIR_LISTEN="127.0.0.1:$PORT"
export THINAIR_LIBVIRT_URI=test:///default THINAIR_PROBE_TIMEOUT=2
"$BIN/thinair" engine --log-level warning >"$WORK/engine.log" 2>&1 &
engine=$!
for _ in $(seq 150); do
  [ -s "$THINAIR_HOME/token" ] && "$BIN/python" -c \
    "import httpx; httpx.get('http://127.0.0.1:$PORT/api/v1/openapi.json').raise_for_status()" \
    2>/dev/null && break
  sleep 0.2
done
"$BIN/st" run "http://127.0.0.1:$PORT/api/v1/openapi.json" \
  -H "Authorization: Bearer $(cat "$THINAIR_HOME/token")" \
  --exclude-path /api/v1/events \
  --checks not_a_server_error --max-examples 25 --generation-deterministic \
  --request-timeout 30 --no-color && status=0 || status=$?
kill $engine
wait $engine || true
exit $status
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_no_request_gets_a_server_error(workdir: Path) -> None:
    done = subprocess.run(
        ["unshare", "--net", "bash", "-c", SCRIPT],
        env={
            "WORK": str(workdir),
            "PORT": str(free_port()),
            "BIN": str(VENV_BIN),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    counts = re.search(r"(\d+) generated, (\d+) passed", done.stdout)
    assert counts and counts.group(1) == counts.group(2) and int(counts.group(1)) > 100, report
