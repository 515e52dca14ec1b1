"""The thinair.virt collection's modules: ansible-doc reads each one's
documentation, whose options are exactly those the module accepts, and whose
EXAMPLES and RETURN are YAML (what ansible-test's validate-modules would check,
without its network set-up)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.support.engine import VENV_BIN

COLLECTION = ROOT / "ansible" / "ansible_collections" / "thinair" / "virt"
MODULES = sorted(p.stem for p in (COLLECTION / "plugins" / "modules").glob("*.py"))


def test_the_collection_has_its_modules() -> None:
    assert MODULES == ["export", "job_info", "storage_domain", "vm", "vm_info"]


def _accepted(module: str, tmp_path: Path) -> set[str]:
    """The options the module accepts, as AnsibleModule lists them for a wrong one."""
    args = tmp_path / "args.json"
    args.write_text(
        json.dumps({"ANSIBLE_MODULE_ARGS": {"name": "x", "state": "absent", "no_such_option": 1}})
    )
    done = subprocess.run(
        [str(VENV_BIN / "python"), str(COLLECTION / "plugins" / "modules" / f"{module}.py"), args],
        env={**os.environ, "PYTHONPATH": str(ROOT / "ansible")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    msg = json.loads(done.stdout)["msg"]
    listed = re.search(r"Supported parameters include: (.*)\.?$", msg)
    assert listed, msg
    return {name.split(" ")[0] for name in listed.group(1).rstrip(".").split(", ")}


@pytest.mark.parametrize("module", MODULES)
def test_module_documents_what_it_accepts(module: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(VENV_BIN / "ansible-doc"), "--json", "-t", "module", f"thinair.virt.{module}"],
        env={
            **os.environ,
            "ANSIBLE_COLLECTIONS_PATH": str(ROOT / "ansible"),
            "ANSIBLE_HOME": str(tmp_path / "ansible"),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)[f"thinair.virt.{module}"]
    assert set(doc["doc"]["options"]) == _accepted(module, tmp_path)
    assert yaml.safe_load(doc["examples"])
    assert isinstance(doc["return"], dict) and doc["return"]
