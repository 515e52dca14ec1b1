"""thinair on PostgreSQL: the same migrations as SQLite, the API on it, and
several engines on one database that never run a job twice."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from inspect import signature as inspect_signature
from pathlib import Path

import libvirt
import pytest
from sqlalchemy import inspect, select

from tests.conftest import ROOT, Engine
from tests.unit import test_api
from tests.unit.test_migrations import check_cancel_column
from thinair.client import ThinairAPIError
from thinair.config import Settings
from thinair.db.models import LOCAL_HOST_ID, Host, Job, Vm
from thinair.db.session import Database
from thinair.engine.context import EngineContext
from thinair.states import JobState

TABLES = {
    "alembic_version",
    "api_tokens",
    "storage_domains",
    "vms",
    "disks",
    "jobs",
    "exports",
    "hosts",
    "installation",
    "audit_log",
}


def test_migrations(pg_url: str) -> None:
    db = Database(pg_url)
    assert db.engine.dialect.name == "postgresql"  # postgresql:// means psycopg 3
    db.upgrade()
    db.upgrade()  # at head already: nothing to do
    assert set(inspect(db.engine).get_table_names()) == TABLES
    with db.session() as s:
        assert s.get_one(Host, LOCAL_HOST_ID).name == "local"
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0007"
    db.dispose()


def test_migration_of_the_cancel_column(pg_url: str) -> None:
    check_cancel_column(Database(pg_url))


def test_engines_share_the_installation_id(pg_url: str, workdir: Path) -> None:
    ids = set()
    for n in range(2):
        ctx = EngineContext(Settings(home=workdir / f"h{n}", db=pg_url, libvirt_uri="x"))
        ctx.migrate()
        ids.add(ctx.engine_id)
        assert (workdir / f"h{n}" / "engine-id").read_text().strip() == ctx.engine_id
        ctx.close()
    assert len(ids) == 1


@pytest.fixture
def pg_engine(make_engine: Callable[..., Engine], pg_url: str) -> Engine:
    return make_engine("test:///default", THINAIR_DB=pg_url)


@pytest.mark.parametrize(
    "case",
    [
        test_api.test_storage_domains,
        test_api.test_vm_life_cycle,
        test_api.test_two_disks_and_remove,
        test_api.test_bad_vm_input_creates_nothing,
        test_api.test_auth,
        test_api.test_one_flow_at_a_time,
    ],
    ids=lambda f: f.__name__.removeprefix("test_"),
)
def test_api_basics(
    case: Callable[..., None], pg_engine: Engine, request: pytest.FixtureRequest
) -> None:
    """The API tests of the SQLite engine, on PostgreSQL."""
    names = inspect_signature(case).parameters
    args = {n: pg_engine if n == "test_engine" else request.getfixturevalue(n) for n in names}
    case(**args)


# -- several engines on one database ------------------------------------------


class Workers:
    """Job runners in processes of their own, on one database."""

    def __init__(self, url: str, root: Path) -> None:
        self.url, self.root = url, root
        self.log = root / "runs.log"
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, count: int) -> list[subprocess.Popen[bytes]]:
        started = []
        for _ in range(count):
            home = self.root / f"worker{len(self.procs)}"
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.support.job_worker",
                    self.url,
                    str(home),
                    str(self.log),
                ],
                cwd=ROOT,
            )
            self.procs.append(proc)
            started.append(proc)
            deadline = time.monotonic() + 60
            while not Path(f"{home}.ready").exists():
                assert proc.poll() is None, "worker died"
                assert time.monotonic() < deadline, "worker not ready in 60 s"
                time.sleep(0.05)
        return started

    def go(self) -> None:
        Path(f"{self.log}.go").write_text("")

    def lines(self) -> list[tuple[str, str, int]]:
        if not self.log.exists():
            return []
        return [
            (w[0], w[1], int(w[2]))
            for w in (line.split() for line in self.log.read_text().splitlines())
        ]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def workers(pg_url: str, workdir: Path) -> Iterator[Workers]:
    w = Workers(pg_url, workdir)
    yield w
    w.stop()


def _add_jobs(db: Database, count: int, seconds: float) -> list[str]:
    with db.session() as s:
        jobs = [
            Job(kind="count", vm_id=None, params={"seconds": seconds}, progress={})
            for _ in range(count)
        ]
        s.add_all(jobs)
        s.flush()
        return [j.id for j in jobs]


def _wait_all_ended(db: Database, ids: list[str], timeout: float = 120) -> dict[str, JobState]:
    deadline = time.monotonic() + timeout
    while True:
        with db.session() as s:
            states = {
                r[0]: r[1] for r in s.execute(select(Job.id, Job.state).where(Job.id.in_(ids)))
            }
        if all(state not in ("pending", "running") for state in states.values()):
            return states
        assert time.monotonic() < deadline, f"jobs still active: {states}"
        time.sleep(0.2)


def test_two_engines_run_each_job_once(pg_url: str, workers: Workers) -> None:
    db = Database(pg_url)
    db.upgrade()
    ids = _add_jobs(db, 40, 0.05)  # waiting before either engine starts: both see them
    procs = workers.start(2)
    workers.go()
    states = _wait_all_ended(db, ids)
    assert set(states.values()) == {"succeeded"}
    runs = workers.lines()
    starts = collections.Counter(job for what, job, _ in runs if what == "start")
    ends = collections.Counter(job for what, job, _ in runs if what == "end")
    assert starts == ends == collections.Counter(ids)  # each job ran once, and only once
    pids = {pid for _, _, pid in runs}
    assert pids <= {p.pid for p in procs}
    db.dispose()


def test_jobs_of_a_dead_engine_go_to_another(pg_url: str, workers: Workers) -> None:
    db = Database(pg_url)
    db.upgrade()
    hold = Path(f"{workers.log}.hold")
    hold.write_text("")  # the jobs wait until this goes
    (first,) = workers.start(1)
    workers.go()
    ids = _add_jobs(db, 5, 0)
    deadline = time.monotonic() + 60
    while len(workers.lines()) < 5:  # the first engine runs all five
        assert time.monotonic() < deadline, workers.lines()
        time.sleep(0.05)
    (second,) = workers.start(1)
    time.sleep(1)  # a few of its looks for jobs: they are all taken
    assert {pid for _, _, pid in workers.lines()} == {first.pid}
    first.send_signal(signal.SIGKILL)  # its connection, and with it its locks, go
    first.wait()
    hold.unlink()
    states = _wait_all_ended(db, ids)
    assert set(states.values()) == {"succeeded"}
    ends = [(job, pid) for what, job, pid in workers.lines() if what == "end"]
    assert sorted(job for job, _ in ends) == sorted(ids)  # run to the end once each
    assert {pid for _, pid in ends} == {second.pid}
    db.dispose()


@pytest.mark.libvirt
def test_two_engines_on_one_libvirt(
    make_engine: Callable[..., Engine], pg_url: str, storage_dir: Path, raw_image: Path
) -> None:
    """Two engines on one database and one libvirtd: an engine starting up leaves
    the other's VMs and export servers alone; either can manage the VMs, only the
    one that runs an export's server can stop it."""
    a = make_engine("qemu:///system", THINAIR_DB=pg_url)
    a.client().storage_domains.add("sd", str(storage_dir))
    vm = a.client().vms.create("so-pg-vm", disks=[str(raw_image)], memory_mib=64)
    export = a.client().exports.create(image=str(raw_image), format="raw")
    b = make_engine("qemu:///system", THINAIR_DB=pg_url)  # reconciles on start
    assert b.log().count("reconcile:") == 0, b.log()
    seen = b.client().exports.get(export.id)
    assert seen.engine is not None and seen.engine.endswith(str(a.home))
    assert a.client().exports.get(export.id).state == "running"
    with pytest.raises(ThinairAPIError) as e:
        b.client().exports.remove(export.id)
    assert e.value.code == "conflict"
    a.client().exports.remove(export.id)
    conn = libvirt.open("qemu:///system")
    try:
        assert conn.lookupByName("so-pg-vm").UUIDString() == vm.id
        assert [v.name for v in b.client().vms.list()] == ["so-pg-vm"]
        b.client().vms.remove("so-pg-vm")
        assert "so-pg-vm" not in [d.name() for d in conn.listAllDomains()]
        assert a.client().vms.list() == []
    finally:
        conn.close()
    assert not os.listdir(storage_dir)
    db = Database(pg_url)
    with db.session() as s:
        assert s.scalars(select(Vm)).all() == []
    db.dispose()


def test_a_long_step_fits(pg_url: str, workdir: Path) -> None:
    """convert writes `virt-v2v: STEP` with virt-v2v's own step names, longer than
    32 characters: PostgreSQL (unlike SQLite) refuses a string over a column's length."""
    ctx = EngineContext(Settings(home=workdir / "h", db=pg_url, libvirt_uri="test:///default"))
    ctx.migrate()
    with ctx.db.session() as s:
        job = Job(kind="convert", vm_id=None, params={}, progress={})
        s.add(job)
        s.flush()
        job_id = job.id
    step = "virt-v2v: Inspecting the source virtual machine"
    ctx.jobs.update(job_id, step=step)
    with ctx.db.session() as s:
        assert s.get_one(Job, job_id).step == step
    ctx.close()


def test_progress_alone_is_committed_without_waiting_for_the_wal(pg_url: str) -> None:
    """A session that need not be durable commits with synchronous_commit off,
    for its own transaction only."""
    db = Database(pg_url)
    db.upgrade()
    job_id = f"sync-{os.getpid()}"
    with db.session(durable=False) as s:
        assert s.connection().exec_driver_sql("SHOW synchronous_commit").scalar_one() == "off"
        s.add(Job(id=job_id, kind="k", state="running", step="copy", params={}, progress={"x": 1}))
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.progress == {"x": 1}
        assert s.connection().exec_driver_sql("SHOW synchronous_commit").scalar_one() == "on"
        s.delete(job)
    db.dispose()
