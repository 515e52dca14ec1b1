"""The thinair.virt Ansible collection, run by ansible-core's own
`ansible-playbook` against a live engine: a storage domain and a VM from an NBD
export, started and imported; a second run changes nothing; --check --diff on a
fresh engine changes nothing; a preview VM is rolled back; an imported VM cannot
be, with the engine's own message."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT, Engine
from tests.support.engine import VENV_BIN
from thinair.adapters import qemu_nbd

pytestmark = pytest.mark.libvirt

MiB = 2**20
PLAYBOOKS = ROOT / "examples" / "ansible"
RECAP = re.compile(r"^localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


def _playbook(
    engine: Engine, workdir: Path, name: str, *args: str, **extra: str
) -> tuple[dict[str, int], str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("THINAIR_", "ANSIBLE_"))},
        "THINAIR_URL": f"http://127.0.0.1:{engine.port}",
        "THINAIR_TOKEN": (engine.home / "token").read_text().strip(),
        "ANSIBLE_COLLECTIONS_PATH": str(ROOT / "ansible"),
        "ANSIBLE_HOME": str(workdir / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(workdir / "ansible-tmp"),
        "ANSIBLE_PYTHON_INTERPRETER": str(VENV_BIN / "python"),  # it has the SDK
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
    }
    argv = [str(VENV_BIN / "ansible-playbook"), "-i", "localhost,", str(PLAYBOOKS / name)]
    for key, value in extra.items():
        argv += ["-e", f"{key}={value}"]
    done = subprocess.run([*argv, *args], env=env, capture_output=True, text=True, timeout=600)
    found = [RECAP.match(line) for line in done.stdout.splitlines()]
    recap = next((m for m in found if m), None)
    assert recap is not None, done.stdout + done.stderr
    ok, changed, unreachable, failed = map(int, recap.groups())
    return {"ok": ok, "changed": changed, "failed": failed + unreachable}, done.stdout


def test_playbook_runs_a_vm_out_of_thin_air(
    make_engine: Callable[..., Engine],
    workdir: Path,
    nbd_export: Callable[..., qemu_nbd.Server],
) -> None:
    image = workdir / "i17-ans.raw"
    with open(image, "wb") as f:
        f.write(os.urandom(4 * MiB))
        f.truncate(32 * MiB)
    export = nbd_export(image)
    tmp, final = workdir / "tmp", workdir / "final"
    for path in (tmp, final):
        path.mkdir(mode=0o755)
    names = {"vm_name": "i17-ans", "preview_name": "i17-ans-preview"}
    where = {"source": export.url, "tmp_dir": str(tmp), "final_dir": str(final), **names}
    engine = make_engine("qemu:///system")
    c = engine.client()

    stats, out = _playbook(engine, workdir, "thin-air.yml", "--check", "--diff", **where)
    assert stats["failed"] == 0 and stats["changed"] == 5, out
    assert "+++ after" in out  # the diff of what would change
    assert c.vms.list() == [] and c.storage_domains.list() == []  # nothing done

    first, out = _playbook(engine, workdir, "thin-air.yml", **where)
    print(f"\nfirst run: {first}")
    assert first["failed"] == 0 and first["changed"] == 5, out
    vm = c.vms.get("i17-ans")
    assert vm.state == "running" and [d.location for d in vm.disks] == ["local"]
    assert [j.state for j in c.jobs.list(vm=vm.id)] == ["succeeded"]
    assert c.vms.get("i17-ans-preview").disks[0].location == "external"

    second, out = _playbook(engine, workdir, "thin-air.yml", **where)
    print(f"second run: {second}")
    assert second["failed"] == 0 and second["changed"] == 0, out
    assert len(c.jobs.list()) == 1  # no second import

    stats, out = _playbook(engine, workdir, "rollback.yml", **names)
    assert stats == {"ok": 1, "changed": 1, "failed": 0}, out
    assert [v.name for v in c.vms.list()] == ["i17-ans"]
    stats, out = _playbook(engine, workdir, "rollback.yml", **names)
    assert stats == {"ok": 1, "changed": 0, "failed": 0}, out

    # The imported VM has nothing to roll back to: the engine's message, unchanged.
    stats, out = _playbook(engine, workdir, "rollback.yml", preview_name="i17-ans")
    assert stats["failed"] == 1, out
    assert "i17-ans: disk vda is local already (imported); there is nothing to roll back" in out
    assert c.vms.get("i17-ans").state == "running"
    c.vms.remove("i17-ans", force=True)
    assert list(tmp.iterdir()) == []
