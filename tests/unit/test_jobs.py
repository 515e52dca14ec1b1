"""The job runner: a cancel request is never lost to a flow's own update."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from thinair.config import Settings
from thinair.db.models import Job
from thinair.db.session import Database
from thinair.engine.context import EngineContext
from thinair.engine.job_params import ConvertParams, ImportParams
from thinair.engine.jobs import JobHandle, JobRunner

KIND = "s16-pivot"


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[JobRunner]:
    ctx = EngineContext(Settings(home=tmp_path, db=None, libvirt_uri="test:///default"))
    ctx.migrate()
    yield ctx.jobs
    ctx.db.dispose()


def test_a_cancel_during_a_pivot_is_not_erased(runner: JobRunner) -> None:
    """The import records the old volume of each disk it pivoted (an update of
    its params) and then looks for a cancel before the next disk: a cancel that
    arrived in between must still be there."""
    started, cancel_sent = threading.Event(), threading.Event()
    seen: list[bool] = []

    def flow(_ctx: EngineContext, job: JobHandle[ImportParams]) -> None:
        started.set()
        assert cancel_sent.wait(10)  # the pivot of the first disk is under way
        job.update(step="switching", params={"old": {**job.params.old, "d1": "/sd/overlay1"}})
        seen.append(job.cancel_requested)
        job.check_cancel()  # before the second disk

    runner.register(KIND, flow, ImportParams)
    job = runner.submit(KIND, None, _params())
    assert started.wait(10)
    runner.cancel(job.id)
    cancel_sent.set()
    assert runner.wait(job.id, lambda j: j.state not in ("pending", "running"), 10)
    assert seen == [True]
    ended = runner.get(job.id)
    assert ended.state == "cancelled"
    assert ended.params["old"] == {"d1": "/sd/overlay1"}  # the flow's update is kept too
    assert ended.cancel_requested


def _params() -> ImportParams:
    return ImportParams(
        to="sd", strategies={"d1": "bulk", "d2": "bulk"}, disks=["d1", "d2"], bandwidth=None
    )


def test_an_update_merges_the_params(runner: JobRunner) -> None:
    """A flow's update gives the keys it changes; the others stay, and the
    flow's copy becomes what is stored."""
    done = threading.Event()
    seen: list[ImportParams] = []

    def flow(_ctx: EngineContext, job: JobHandle[ImportParams]) -> None:
        job.update(params={"old": {"d1": "/sd/overlay1"}})
        job.update(params={"verify": "full"})
        seen.append(job.params)
        done.set()

    runner.register(KIND, flow, ImportParams)
    job = runner.submit(KIND, None, _params())
    assert done.wait(10)
    assert runner.wait(job.id, lambda j: j.state == "succeeded", 10)
    stored = runner.get(job.id).params
    assert stored == {**_params().model_dump(), "old": {"d1": "/sd/overlay1"}, "verify": "full"}
    assert seen == [ImportParams.model_validate(stored)]


def test_params_are_checked(runner: JobRunner) -> None:
    """A key the flow's model does not have fails the flow (a bug), not silently."""

    def flow(_ctx: EngineContext, job: JobHandle[ImportParams]) -> None:
        job.update(params={"cancel": True})

    runner.register(KIND, flow, ImportParams)
    job = runner.submit(KIND, None, _params())
    assert runner.wait(job.id, lambda j: j.state == "failed", 10)
    ended = runner.get(job.id)
    assert ended.error is not None and "cancel" in ended.error
    assert "cancel" not in ended.params and not ended.cancel_requested
    with pytest.raises(TypeError, match="ImportParams"):
        runner.submit(KIND, None, ConvertParams())


def test_progress_alone_is_written_without_a_sync(tmp_path: Path) -> None:
    """A session that need not be durable commits (another connection sees it)
    without a sync at commit; the connection it used syncs again afterwards."""
    url = f"sqlite:///{tmp_path / 'db'}"
    db = Database(url)
    db.upgrade()
    with db.session(durable=False) as s:
        assert s.connection().exec_driver_sql("PRAGMA synchronous").scalar_one() == 1  # NORMAL
        s.add(Job(id="j1", kind="k", state="running", step="copy", params={}, progress={"x": 1}))
    other = Database(url)
    with other.session() as s:
        job = s.get(Job, "j1")
        assert job is not None and job.progress == {"x": 1}
    other.dispose()
    with db.session() as s:
        assert s.connection().exec_driver_sql("PRAGMA synchronous").scalar_one() == 2  # FULL
    with pytest.raises(RuntimeError), db.session(durable=False) as s:
        s.add(Job(id="j2", kind="k", state="running", step="copy", params={}, progress={}))
        raise RuntimeError("half way")
    with db.session() as s:
        assert s.get(Job, "j2") is None  # rolled back
        assert s.connection().exec_driver_sql("PRAGMA synchronous").scalar_one() == 2
    db.dispose()
