"""The states' table and guard (thinair/states.py)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.exc import StatementError

from tests.conftest import Engine
from thinair import models, states
from thinair.api.app import create_app
from thinair.client import ThinairAPIError
from thinair.config import Settings
from thinair.db.models import Vm
from thinair.db.session import Database
from thinair.errors import BackendError, Conflict
from thinair.states import (
    TRANSITIONS,
    ExportPhase,
    InvalidTransition,
    JobState,
    VmPhase,
    move,
    require_phase,
)


@dataclass
class _Record:
    name: str
    phase: str


def test_values_are_the_stored_strings() -> None:
    assert [p.value for p in VmPhase] == ["creating", "converting", "ready", "removing"]
    assert [p.value for p in ExportPhase] == ["creating", "ready", "removing"]
    assert [s.value for s in JobState] == [
        "pending",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    ]
    assert VmPhase.READY == "ready" and f"{VmPhase.READY}" == "ready"


def test_the_table_covers_every_state() -> None:
    for kind, moves in TRANSITIONS.items():
        assert set(moves) == set(kind), kind
        for targets in moves.values():
            assert all(isinstance(t, kind) for t in targets)


@pytest.mark.parametrize(
    ("current", "new"),
    [
        ("creating", VmPhase.READY),
        ("creating", VmPhase.CONVERTING),
        ("converting", VmPhase.READY),
        ("ready", VmPhase.REMOVING),
        ("removing", VmPhase.REMOVING),
        ("creating", ExportPhase.READY),
        ("pending", JobState.RUNNING),
        ("running", JobState.RUNNING),
        ("running", JobState.CANCELLED),
    ],
)
def test_allowed_moves(current: str, new: states.S) -> None:
    assert move(current, new) is new


@pytest.mark.parametrize(
    ("current", "new"),
    [
        ("ready", VmPhase.CREATING),
        ("removing", VmPhase.READY),
        ("ready", VmPhase.CONVERTING),
        ("removing", ExportPhase.READY),
        ("succeeded", JobState.RUNNING),
        ("pending", JobState.SUCCEEDED),
        ("bogus", VmPhase.READY),
    ],
)
def test_a_bad_move_is_a_bug(current: str, new: states.S) -> None:
    with pytest.raises(InvalidTransition, match=f"{current!r} cannot become {new.value!r}"):
        move(current, new)


def test_require_phase() -> None:
    require_phase(_Record("web1", "ready"), VmPhase.READY)
    require_phase(_Record("web1", "converting"), VmPhase.READY, VmPhase.CONVERTING)
    with pytest.raises(Conflict) as e:
        require_phase(_Record("web1", "creating"), VmPhase.READY)
    assert e.value.message == "VM 'web1' is creating"  # what users have always seen
    with pytest.raises(BackendError, match="^gone$"):
        require_phase(None, VmPhase.CONVERTING, error=BackendError, message="gone")


def test_states_is_at_the_bottom() -> None:
    """It imports nothing of thinair but the errors, so every layer may use it."""
    tree = ast.parse(Path(states.__file__).read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    } | {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert {m for m in imported if m.startswith("thinair")} == {"thinair.errors"}


def test_the_openapi_document_carries_the_enums(tmp_path: Path) -> None:
    """The API's schema names each state's values, so a generated client (and
    the SDK, which shares thinair/models.py) gets them as enums."""
    doc = create_app(Settings(home=tmp_path, libvirt_uri="test:///default")).openapi()
    schemas = doc["components"]["schemas"]

    def values(model: str, field: str) -> list[str]:
        prop = schemas[model]["properties"][field]
        ref = prop.get("$ref") or next(p["$ref"] for p in prop.get("allOf", []))
        return list(schemas[ref.rsplit("/", 1)[1]]["enum"])

    assert values("Vm", "phase") == [p.value for p in VmPhase]
    assert values("Vm", "state") == [s.value for s in states.VmState]
    assert values("Export", "phase") == [p.value for p in ExportPhase]
    assert values("Job", "state") == [s.value for s in JobState]
    assert schemas["Job"]["properties"]["cancel_requested"]["type"] == "boolean"
    assert models.Vm.model_fields["phase"].annotation is VmPhase  # the SDK's


def test_the_columns_hold_the_enums(tmp_path: Path) -> None:
    """A read gives the enum; a write of a value it does not have fails."""
    db = Database(f"sqlite:///{tmp_path / 'db'}")
    db.upgrade()
    with db.session() as s:
        s.add(Vm(id="vm", name="st1", memory_mib=64, cpus=1, domain_type="qemu", console_log=""))
    with db.session() as s:
        vm = s.get_one(Vm, "vm")
        assert vm.phase is VmPhase.CREATING
        vm.phase = move(vm.phase, VmPhase.READY)
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT phase FROM vms").scalar() == "ready"
    with pytest.raises(StatementError, match="'bogus' is not a valid VmPhase"), db.session() as s:
        s.get_one(Vm, "vm").phase = "bogus"  # type: ignore[assignment]
    db.dispose()


def test_every_flow_guards_with_the_same_words(
    test_engine: Engine, storage_dir: Path, raw_image: Path
) -> None:
    """A VM that is not ready (here, converting) is refused by start, stop,
    import and the export of its disk, each with the message users always saw."""
    c = test_engine.client()
    c.storage_domains.add("sd", str(storage_dir))
    c.vms.create("st-guard", disks=[str(raw_image)], memory_mib=64)
    db = Database(test_engine.settings.db_url)
    with db.session() as s:
        s.execute(update(Vm).where(Vm.name == "st-guard").values(phase=VmPhase.CONVERTING))
    db.dispose()
    assert c.vms.get("st-guard").phase is VmPhase.CONVERTING  # the SDK's enum
    for action in (
        lambda: c.vms.start("st-guard"),
        lambda: c.vms.stop("st-guard"),
        lambda: c.vms.import_("st-guard", to="sd"),
        lambda: c.exports.create(vm="st-guard"),
    ):
        with pytest.raises(ThinairAPIError) as e:
            action()
        assert (e.value.code, e.value.message) == ("conflict", "VM 'st-guard' is converting")
