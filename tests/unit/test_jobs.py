"""The job runner: a cancel request is never lost to a flow's own update."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from thinair.config import Settings
from thinair.engine.context import EngineContext
from thinair.engine.jobs import JobHandle, JobRunner

KIND = "s16-pivot"


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[JobRunner]:
    ctx = EngineContext(Settings(home=tmp_path, db=None, libvirt_uri="test:///default"))
    ctx.migrate()
    runner = JobRunner(ctx)
    ctx.jobs = runner
    yield runner
    ctx.db.dispose()


def test_a_cancel_during_a_pivot_is_not_erased(runner: JobRunner) -> None:
    """The import records the old volume of each disk it pivoted (an update of
    its params) and then looks for a cancel before the next disk: a cancel that
    arrived in between must still be there."""
    started, cancel_sent = threading.Event(), threading.Event()
    seen: list[bool] = []

    def flow(_ctx: EngineContext, job: JobHandle) -> None:
        started.set()
        assert cancel_sent.wait(10)  # the pivot of the first disk is under way
        job.update(step="switching", params={**job.params, "old": {"d1": "/sd/overlay1"}})
        seen.append(job.cancel_requested)
        job.check_cancel()  # before the second disk

    runner.flows[KIND] = flow
    job = runner.submit(KIND, None, {"disks": ["d1", "d2"], "old": {}})
    assert started.wait(10)
    runner.cancel(job.id)
    cancel_sent.set()
    assert runner.wait(job.id, lambda j: j.state not in ("pending", "running"), 10)
    assert seen == [True]
    ended = runner.get(job.id)
    assert ended.state == "cancelled"
    assert ended.params["old"] == {"d1": "/sd/overlay1"}  # the flow's update is kept too
