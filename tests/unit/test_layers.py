"""The layers of thinair: every module's imports, read from its source (ast, no
execution), go down the table below or stay in their layer, never up, and
never round in a cycle; no module uses another's private names. Then every
module is imported, in layer order, in a fresh interpreter.

Imports under `if TYPE_CHECKING:` are for annotations only and run never: they
are left out. Imports inside functions (late imports) run: they count.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "thinair"

# Low to high. A module belongs to the layer of the longest prefix that names
# it (a prefix is a module or a package, with everything below it). A module
# may import from its own layer and those above it in this list, nothing later.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # What everything may use: errors, settings, the API's models, states, URLs.
    (
        "base",
        (
            "thinair.version",
            "thinair.errors",
            "thinair.config",
            "thinair.states",
            "thinair.models",
            "thinair.external",
        ),
    ),
    # One thin module per tool: qemu-img, qemu-nbd, nbdkit, libnbd, libvirt, ...
    ("adapters", ("thinair.adapters",)),
    # The records and their migrations.
    ("db", ("thinair.db",)),
    # The engine's core: the context (settings, database, libvirt, locks, the
    # job runner), events, crash points, checks of storage and paths.
    (
        "engine core",
        (
            "thinair.engine",
            "thinair.engine.context",
            "thinair.engine.jobs",
            "thinair.engine.job_params",
            "thinair.engine.events",
            "thinair.engine.faults",
            "thinair.engine.import_state",
            "thinair.engine.working_sets",
            "thinair.engine.probe",
            "thinair.engine.storage",
        ),
    ),
    # What the flows share besides VMs: hosts, bridges, OVAs, the outage watcher,
    # the bridges' readahead.
    (
        "engine services",
        (
            "thinair.engine.hosts",
            "thinair.engine.bridges",
            "thinair.engine.ova",
            "thinair.engine.outages",
            "thinair.engine.readahead",
        ),
    ),
    # What every flow needs of a VM.
    ("engine machines", ("thinair.engine.machines",)),
    # The flows. One may call another's public functions (create --convert
    # submits a conversion; an import releases the exports it read).
    (
        "engine flows",
        (
            "thinair.engine.vms",
            "thinair.engine.imports",
            "thinair.engine.exports",
            "thinair.engine.convert",
        ),
    ),
    # What runs every flow: the reconciler, and the engine built whole.
    ("engine top", ("thinair.engine.reconcile", "thinair.engine.build")),
    # The REST API and what it serves (the web UI's files).
    ("api", ("thinair.api", "thinair.web")),
    # The SDK (re-exported by the package itself) and the CLI on top of it.
    ("front", ("thinair", "thinair.client", "thinair.cli")),
]

# Not imported as modules: Alembic runs them (env.py configures Alembic when loaded).
NOT_IMPORTABLE = ("thinair.db.migrations",)


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, (_name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank >= 0, f"{module} is in no layer: add it to LAYERS"
    return rank


def all_modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


@dataclass(frozen=True)
class Use:
    target: str  # a thinair module
    line: int
    private: str | None = None  # a private name of `target` that is used


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def uses(module: str, path: Path, modules: dict[str, Path]) -> list[Use]:
    """The thinair modules `module` imports when it runs, and the private names
    of other modules it uses."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Use] = []
    aliases: dict[str, str] = {}  # a local name bound to a thinair module

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.orelse:
                visit(stmt)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "thinair" or alias.name.startswith("thinair."):
                    found.append(Use(alias.name, node.lineno))
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if base == "thinair" or base.startswith("thinair."):
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        found.append(Use(sub, node.lineno))
                        aliases[alias.asname or alias.name] = sub
                    else:
                        private = None
                        if alias.name.startswith("_") and not alias.name.startswith("__"):
                            private = alias.name
                        found.append(Use(base, node.lineno, private))
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(Use(aliases[node.value.id], node.lineno, node.attr))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _family(a: str, b: str) -> bool:
    """The modules of one small package (engine/exports/) may share private
    names; those of a layer's package (engine/, api/) may not."""
    parent = a.rpartition(".")[0]
    return (parent == b.rpartition(".")[0] and parent.count(".") >= 2) or a.startswith(b + ".")


def test_every_import_goes_down_or_stays_in_its_layer() -> None:
    modules = all_modules()
    problems = []
    for module, path in modules.items():
        mine = layer_of(module)
        for use in uses(module, path, modules):
            theirs = layer_of(use.target)
            if theirs > mine:
                problems.append(
                    f"{path.relative_to(ROOT)}:{use.line}: {module} ({LAYERS[mine][0]}) "
                    f"imports {use.target} ({LAYERS[theirs][0]}), a higher layer"
                )
    assert not problems, "\n".join(problems)


def test_no_module_uses_another_modules_private_names() -> None:
    modules = all_modules()
    problems = [
        f"{path.relative_to(ROOT)}:{use.line}: {module} uses {use.target}.{use.private}"
        for module, path in modules.items()
        for use in uses(module, path, modules)
        if use.private and use.target != module and not _family(module, use.target)
    ]
    assert not problems, "\n".join(problems)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {
        module: {u.target for u in uses(module, path, modules) if u.target != module}
        for module, path in modules.items()
    }


def test_no_import_cycle() -> None:
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    # The test above can fail: a cycle three modules long is found.
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "d": {"a"}}) is None


def test_a_higher_import_is_caught(tmp_path: Path) -> None:
    # The layer test can fail too: an adapter importing the engine is seen.
    fake = tmp_path / "x.py"
    fake.write_text(
        "from typing import TYPE_CHECKING\n"
        "from thinair.engine import vms\n"
        "if TYPE_CHECKING:\n"
        "    from thinair.api import app\n"
        "def f():\n"
        "    return vms._cancel_jobs\n"
    )
    modules = all_modules()
    found = uses("thinair.adapters.x", fake, modules)
    assert [(u.target, u.private) for u in found] == [
        ("thinair.engine.vms", None),
        ("thinair.engine.vms", "_cancel_jobs"),
    ]
    assert layer_of("thinair.engine.vms") > layer_of("thinair.adapters.x")


def test_every_module_imports_in_layer_order() -> None:
    """`python -c "import M"` for every module, lowest layer first, in one fresh
    interpreter: a cycle the ast walk missed would fail here."""
    modules = [m for m in all_modules() if not any(m.startswith(p) for p in NOT_IMPORTABLE)]
    modules.sort(key=lambda m: (layer_of(m), m))
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    done = subprocess.run(
        [sys.executable, "-c", code, *modules], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
