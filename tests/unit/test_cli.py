"""The CLI as an admin who knows virsh uses it: piped output is whole rows a
script can cut, a terminal's tables fit its width without cutting IDs, URLs or
paths, any unique id prefix is taken, errors speak the CLI's words (JSON with
--json), rollback asks first on a terminal, help shows defaults.

Through Typer's CliRunner (in process, output not a terminal), a real pipe
(subprocess) and a pseudo-terminal of a given width."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import Engine
from tests.support.engine import VENV_BIN
from thinair import cli, models
from thinair.db import refs
from thinair.db.models import StorageDomain
from thinair.db.session import Database
from thinair.errors import InvalidInput, NotFound
from thinair.states import JobState

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def invoke(engine: Engine, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(cli.app, list(args), env=engine.env)
    return result.exit_code, result.stdout, result.stderr


def on_terminal(
    engine: Engine,
    *args: str,
    columns: int = 60,
    answer: str | None = None,
    interact: Callable[[int, bytearray], None] | None = None,
) -> tuple[int, str]:
    """Run `thinair ARGS` on a pseudo-terminal `columns` wide; type `answer` when
    it asks, or let `interact` read and write the terminal (its leader side and
    what it showed so far). Returns the exit status and what the terminal showed
    (no escapes)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {**engine.env, "TERM": "xterm", "COLUMNS": str(columns)}
    proc = subprocess.Popen(
        [str(VENV_BIN / "thinair"), *args],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        close_fds=True,
    )
    os.close(follower)
    shown = bytearray()
    if interact is not None:
        interact(leader, shown)
    deadline = time.monotonic() + 60
    answered = answer is None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the process ended and closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        if not answered and b"[y/N]" in shown:
            os.write(leader, f"{answer}\n".encode())
            answered = True
        if proc.poll() is not None and not ready:
            break
    proc.wait(10)
    os.close(leader)
    return proc.returncode, ANSI.sub("", shown.decode(errors="replace")).replace("\r", "")


@pytest.fixture
def long_sd(test_engine: Engine, workdir: Path) -> Path:
    """A storage domain whose path is long enough to be cut at 80 columns."""
    path = workdir / ("a-storage-domain-with-a-rather-long-directory-name-" + "x" * 20)
    path.mkdir(mode=0o755)
    test_engine.client().storage_domains.add("i18-sd", str(path))
    return path


def test_piped_rows_are_whole(test_engine: Engine, long_sd: Path, raw_image: Path) -> None:
    c = test_engine.client()
    vm = c.vms.create("i18-pipe", disks=[str(raw_image)], memory_mib=64)
    volume = vm.disks[0].volume_path
    for args in (("vm", "show", "i18-pipe"), ("vm", "list"), ("storage", "list")):
        done = test_engine.cli(*args, check=True)  # a real pipe
        lines = done.stdout.splitlines()
        assert all(line == line.rstrip() for line in lines), args  # no padding at the end
        assert all(len(line.split()) > 1 for line in lines if line), args  # nothing wrapped
    shown = test_engine.cli("vm", "show", "i18-pipe", check=True).stdout
    assert sum(volume in line and str(raw_image) in line for line in shown.splitlines()) == 1
    listed = test_engine.cli("storage", "list", check=True).stdout.splitlines()
    assert listed[0].split() == ["NAME", "PATH", "FREE", "SIZE", "HOSTS"]
    assert listed[1].split()[:2] == ["i18-sd", str(long_sd)]
    # --no-wait's hint is one line with the whole command in it.
    final = long_sd.parent / "final"
    final.mkdir(mode=0o755)
    c.storage_domains.add("i18-final", str(final))
    hint = test_engine.cli("vm", "import", "i18-pipe", "--to", "i18-final", "--no-wait", check=True)
    job_id = re.search(r"`thinair jobs watch (\S+)`", hint.stdout)
    assert job_id and len(hint.stdout.strip().splitlines()) == 1
    # Any unique prefix of its id is the job, as git and docker take them.
    watched = test_engine.cli("jobs", "watch", job_id[1][:8], check=True)
    assert f"job {job_id[1]} succeeded" in watched.stdout
    assert all(line == line.rstrip() for line in watched.stdout.splitlines())
    # The task log: VM name, target domain by name, start time in UTC, duration.
    jobs = test_engine.cli("jobs", "list", check=True).stdout.splitlines()
    assert jobs[0].split()[:9] == [
        "ID", "KIND", "VM", "TO", "STATE", "STEP", "DONE", "STARTED", "TOOK"
    ]  # fmt: skip
    row = jobs[1].split()
    assert row[:5] == [job_id[1], "import", "i18-pipe", "i18-final", "succeeded"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row[7]) and row[8].endswith("s")
    assert test_engine.cli("jobs", check=True).stdout.splitlines() == jobs  # the same
    steps = test_engine.cli("jobs", "show", job_id[1][:6], check=True).stdout
    assert "running" in steps and "succeeded" in steps and "STEP" in steps


def test_terminal_fits_without_cutting(test_engine: Engine, long_sd: Path, raw_image: Path) -> None:
    c = test_engine.client()
    vm = c.vms.create("i18-tty", disks=[str(raw_image)], memory_mib=64)
    status, shown = on_terminal(test_engine, "vm", "show", "i18-tty", columns=60)
    assert status == 0, shown
    # The path is longer than the terminal: it is whole (the terminal wraps the
    # line, not the table), never folded into pieces on separate rows.
    joined = shown.replace("\n", "")
    assert vm.disks[0].volume_path in joined and str(raw_image) in joined
    status, shown = on_terminal(test_engine, "storage", "list", columns=60)
    assert str(long_sd) in shown.replace("\n", "")


def test_rollback_asks_on_a_terminal(test_engine: Engine, long_sd: Path, raw_image: Path) -> None:
    c = test_engine.client()
    c.vms.create("i18-rb", disks=[str(raw_image)], memory_mib=64)
    status, shown = on_terminal(test_engine, "vm", "rollback", "i18-rb", columns=200, answer="n")
    assert status == 1 and "nothing done" in shown, shown
    assert "undefine its domain and delete" in shown and str(raw_image) in shown
    assert "temporary disk" in shown
    assert c.vms.get("i18-rb").name == "i18-rb"  # still there
    status, shown = on_terminal(test_engine, "vm", "rollback", "i18-rb", columns=200, answer="y")
    assert status == 0 and "rolled back i18-rb" in shown, shown
    assert [vm.name for vm in c.vms.list()] == []
    # --yes on a terminal, and a script (stdin not a terminal) are not asked.
    c.vms.create("i18-rb", disks=[str(raw_image)], memory_mib=64)
    status, shown = on_terminal(test_engine, "vm", "rollback", "i18-rb", "--yes")
    assert status == 0 and "[y/N]" not in shown
    c.vms.create("i18-rb", disks=[str(raw_image)], memory_mib=64)
    test_engine.cli("vm", "rollback", "i18-rb", check=True)
    assert c.vms.list() == []


def test_errors_in_the_clis_words(test_engine: Engine, long_sd: Path, raw_image: Path) -> None:
    c = test_engine.client()
    c.vms.create("i18-err", disks=[str(raw_image)], memory_mib=64)
    cases = {
        ("vm", "import", "i18-err", "--to", "i18-sd", "--bandwidth", "-5"): (
            "--bandwidth must be greater than 0"
        ),
        ("vm", "create", "x"): "give --disk URL",
        ("vm", "create", "bad name", "--disk", str(raw_image)): "NAME must be 1-64 letters",
        ("vm", "create", "y", "--disk", "nbd:/host:10899/guest"): "has no host",
        ("vm", "create", "y", "--memory", "1", "--disk", str(raw_image)): "--memory must be",
        ("vm", "import", "i18-err", "--to", "nope"): "no storage domain 'nope'; there are: i18-sd",
        ("jobs", "watch", "0000"): "no job '0000'",
    }
    for args, words in cases.items():
        status, stdout, stderr = invoke(test_engine, *args)
        assert status == 1 and words in stderr, (args, stderr)
        assert "Input should" not in stderr and "Value error" not in stderr
        status, stdout, stderr = invoke(test_engine, *args, "--json")
        assert status == 1 and json.loads(stderr)["error"]["message"], (args, stderr)
    assert c.vms.list()[0].name == "i18-err" and len(c.vms.list()) == 1  # nothing made
    result = runner.invoke(
        cli.app, ["vm", "list"], env={**test_engine.env, "THINAIR_URL": "127.0.0.1:8611"}
    )
    assert result.exit_code == 1 and "THINAIR_URL must be http://HOST:PORT" in result.stderr
    # Prefixes, and what the JSON gives: times in UTC with the zone.
    vm = json.loads(test_engine.cli("vm", "show", c.vms.get("i18-err").id[:8], "--json").stdout)
    sd = json.loads(test_engine.cli("storage", "list", "--json").stdout)[0]
    for stamp in (vm["created_at"], sd["created_at"]):
        assert datetime.fromisoformat(stamp).utcoffset() is not None, stamp
        assert stamp.endswith("Z")


def test_ambiguous_prefix_names_the_matches(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'refs.db'}")
    db.upgrade()
    with db.session() as s:
        for suffix, name in (("1111", "one"), ("2222", "two")):
            s.add(StorageDomain(id=f"abcd{suffix}-0000", name=name, path=f"/{name}"))
    with db.session() as s:
        assert refs.find(s, StorageDomain, "abcd1", "storage domain").name == "one"
        assert refs.find(s, StorageDomain, "two", "storage domain").name == "two"
        with pytest.raises(InvalidInput, match=r"ambiguous: it matches one \(abcd1111\), two"):
            refs.find(s, StorageDomain, "abcd", "storage domain")
        with pytest.raises(NotFound, match="no storage domain 'abc'; there are: one, two"):
            refs.find(s, StorageDomain, "abc", "storage domain", list_existing=True)
        with pytest.raises(NotFound):  # a LIKE pattern is no prefix
            refs.find(s, StorageDomain, "abc%", "storage domain")
    db.dispose()


def test_help_shows_defaults_without_tags() -> None:
    shown = runner.invoke(cli.app, ["vm", "create", "--help"], env={"COLUMNS": "100"}).stdout
    assert "[default: 512]" in shown and "[default: 1]" in shown and "--memory MiB" in shown
    assert "<bool>" not in shown and "<list[str]>" not in shown and "╭" not in shown
    assert "check-readonly=off" in shown.replace("\n", " ").replace("  ", "")
    rollback = runner.invoke(cli.app, ["vm", "rollback", "--help"]).stdout
    assert "Delete the VM" in rollback and "qm rollback" in rollback and "--yes" in rollback
    stop = runner.invoke(cli.app, ["vm", "stop", "--help"]).stdout
    assert "--timeout" in stop and "ACPI" in stop
    assert "show" in runner.invoke(cli.app, ["jobs", "--help"]).stdout


def test_vm_stop_says_what_it_waits_for(
    test_engine: Engine, long_sd: Path, raw_image: Path
) -> None:
    c = test_engine.client()
    c.vms.create("i18-stop", disks=[str(raw_image)], memory_mib=64)
    c.vms.start("i18-stop")
    done = test_engine.cli("vm", "stop", "i18-stop", "--timeout", "30", check=True)
    assert "waiting for i18-stop to power off after an ACPI shutdown, up to 30 s" in done.stderr
    assert done.stdout.strip() == "i18-stop is stopped"
    bad = test_engine.cli("vm", "stop", "i18-stop", "--timeout", "0")
    assert bad.returncode == 1 and "--timeout must be greater than 0" in bad.stderr


def test_host_memory_free_is_within_total(test_engine: Engine) -> None:
    for host in json.loads(test_engine.cli("host", "list", "--json", check=True).stdout):
        assert 0 <= host["free_memory_mib"] <= host["memory_mib"], host


def _job(**progress: object) -> models.Job:
    now = datetime.now(UTC)
    return models.Job(
        id="j", kind="import", vm_id="v", state=JobState.RUNNING, step="copy vda",
        params={"disks": ["d"], "bandwidth": 5 * 2**20}, progress=progress, error=None,
        created_at=now, updated_at=now, finished_at=None,
    )  # fmt: skip


def test_copying_and_rate_words() -> None:
    disk = models.Disk(
        id="d", vm_id="v", target="vda", storage_domain="sd", volume_path="/sd/x",
        volume_format="qcow2", virtual_size=2**30, location="external",
        external_disk=models.ExternalDisk(url="nbd://h/x", format="raw"),
    )  # fmt: skip
    job = _job(disks={"vda": {"done": 2**29, "total": 2**30}}, rate=3 * 2**20)
    assert cli._where(disk, job) == "copying 50%"
    assert cli._where(disk) == "external"
    assert cli._rate(job) == "3.0 MiB/s (limit 5 MiB/s)"


def test_console_websocket_refusals(test_engine: Engine, long_sd: Path, raw_image: Path) -> None:
    """The web terminal's WebSocket: a token first, not a read-only one, a VM that
    exists and runs; each refusal closes with its code and says why."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    c = test_engine.client()
    c.vms.create("i18-ws", disks=[str(raw_image)], memory_mib=64)
    admin = (test_engine.home / "token").read_text().strip()
    reader = c.tokens.create("i18-reader", read_only=True).token
    url = f"ws://127.0.0.1:{test_engine.port}/api/v1/vms/%s/console/ws"
    for vm, token, code, words in (
        ("i18-ws", "wrong", 4401, "invalid or revoked token"),
        ("i18-ws", reader, 4403, "read-only"),
        ("nope", admin, 4404, "no VM 'nope'"),
        ("i18-ws", admin, 4409, "i18-ws is stopped: start it first"),
    ):
        with connect(url % vm) as ws:
            ws.send(json.dumps({"token": token}))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, words in closed.value.rcvd.reason) == (code, True)
