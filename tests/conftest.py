"""Fixtures: a real engine process, real qemu-nbd exports, directories QEMU can reach."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from tests.support.engine import Engine
from tests.support.postgres import Cluster, start_cluster
from thinair.adapters import procfs, qemu_nbd

ROOT = Path(__file__).resolve().parent.parent
TEST_ROOT = Path("/var/tmp/thinair-tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test that boots a guest needs libvirtd as well.
    for item in items:
        if "guest" in item.keywords:
            item.add_marker(pytest.mark.libvirt)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh directory that QEMU's own user can reach (pytest's tmp_path is 0700)."""
    TEST_ROOT.mkdir(mode=0o755, exist_ok=True)
    os.chmod(TEST_ROOT, 0o755)
    path = TEST_ROOT / uuid.uuid4().hex[:12]
    path.mkdir(mode=0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _cleanup_domains(engine: Engine) -> None:
    """Remove any domain this engine left, so one failing test does not spoil the next."""
    try:
        conn = libvirt.open(engine.libvirt_uri)
    except libvirt.libvirtError:
        return
    from thinair.adapters.virt import Virt

    engine_id_file = engine.home / "engine-id"
    if not engine_id_file.exists():
        return
    engine_id = engine_id_file.read_text().strip()
    for dom in conn.listAllDomains():
        owner = Virt.owner(dom)
        if owner and owner[0] == engine_id:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
    conn.close()


@pytest.fixture
def make_engine(workdir: Path) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(libvirt_uri: str = "qemu:///system", start: bool = True, **env: str) -> Engine:
        engine = Engine(
            home=workdir / f"home{len(engines)}", libvirt_uri=libvirt_uri, extra_env=env
        )
        engines.append(engine)
        if start:
            engine.start()
        return engine

    yield make
    for engine in engines:
        engine.stop()
        if engine.libvirt_uri != "test:///default":
            _cleanup_domains(engine)
        _stop_servers(engine)


def _stop_servers(engine: Engine) -> None:
    """Stop the bridges and export servers a failed test left running: they
    outlive the engine by design, so the engine's own stop leaves them."""
    programs = frozenset({"nbdkit", "qemu-nbd", "nginx"})
    for pid in procfs.find(programs, str(engine.home) + "/"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


@contextlib.contextmanager
def module_engine(prefix: str, **env: str) -> Iterator[tuple[Engine, Path]]:
    """An engine on libvirt's test driver for a whole test module, in a fresh
    directory TEST_ROOT/PREFIX-xxxx (its home is home/ there; the test may put
    images and storage domains beside it); all removed afterwards."""
    TEST_ROOT.mkdir(mode=0o755, exist_ok=True)
    base = TEST_ROOT / f"{prefix}-{uuid.uuid4().hex[:8]}"
    base.mkdir(mode=0o755)
    engine = Engine(home=base / "home", libvirt_uri="test:///default", extra_env=env)
    try:
        yield engine, base
    finally:
        engine.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def test_engine(make_engine: Callable[..., Engine]) -> Engine:
    """An engine on libvirt's test driver: fast, no hypervisor."""
    return make_engine("test:///default")


@pytest.fixture
def storage_dir(workdir: Path) -> Path:
    path = workdir / "sd"
    path.mkdir(mode=0o755)
    return path


@pytest.fixture
def raw_image(workdir: Path) -> Path:
    """A 64 MiB raw image with a recognizable first MiB."""
    path = workdir / "src.raw"
    with open(path, "wb") as f:
        f.write(os.urandom(1024 * 1024))
        f.truncate(64 * 1024 * 1024)
    return path


@pytest.fixture
def nbd_export() -> Iterator[Callable[..., qemu_nbd.Server]]:
    """Start qemu-nbd exports that are stopped after the test."""
    servers: list[qemu_nbd.Server] = []

    def start(image: Path, fmt: str = "raw", **kwargs: object) -> qemu_nbd.Server:
        server = qemu_nbd.Server(str(image), fmt=fmt, export_name="disk", **kwargs)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """A PostgreSQL cluster of the tests' own, for the whole run."""
    TEST_ROOT.mkdir(mode=0o755, exist_ok=True)
    cluster = start_cluster(TEST_ROOT)
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(postgres: Cluster) -> str:
    """A fresh PostgreSQL database (postgresql://...)."""
    return postgres.create_database()
