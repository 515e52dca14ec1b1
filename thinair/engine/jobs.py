"""Jobs: durable records of long operations, run in threads of the engine.

A job is written before it runs and updated at every step, so an engine that
dies mid-job finds it on restart and runs it again: each flow's steps are
idempotent and pick up from what libvirt and the storage hold. Cancellation is
asked for in the record too (a column of its own, which no update of the
params touches), so it survives a restart as well.

Each flow has its parameters' model (engine/job_params.py): the flow sees them
typed, and an update merges the keys it gives into the stored ones. A job's
state moves only as states.TRANSITIONS allows.

Several engines on one PostgreSQL database share the jobs: an engine runs a job
only while it holds the job's advisory lock (db/locks.py), taken before the job
is written. The lock goes with the engine when it dies, and another engine
then picks the job up (each engine looks for such jobs every few seconds).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from sqlalchemy import select

from thinair import models
from thinair.db import refs
from thinair.db.models import Job, aware, new_id, utcnow
from thinair.engine.job_params import JobParams
from thinair.errors import Conflict, NotFound, ThinairError
from thinair.states import JOB_ACTIVE, JobState, move

if TYPE_CHECKING:
    from thinair.engine.context import EngineContext

log = logging.getLogger(__name__)

ACTIVE = JOB_ACTIVE
P = TypeVar("P", bound=JobParams)
# The job log keeps a sample of the bytes done at most this often, and at most
# this many (then every other one goes: an hour-long copy still fits).
LOG_SAMPLE_INTERVAL = 2.0
LOG_SAMPLES = 240


def _log(job: Job, what: str | None, sample: bool = False) -> None:
    """Append to the job's log: a step or state (`what`), or a sample of the bytes
    done, no more often than LOG_SAMPLE_INTERVAL."""
    entries = list(job.log or [])
    now = utcnow()
    done = (job.progress or {}).get("done")
    if sample:
        samples = [e for e in entries if e.get("what") is None]
        if done is None or (
            samples
            and (now - datetime.fromisoformat(samples[-1]["at"])).total_seconds()
            < LOG_SAMPLE_INTERVAL
        ):
            return
        if len(samples) >= LOG_SAMPLES:  # thin the samples out, keep every step
            drop = {id(e) for e in samples[::2]}
            entries = [e for e in entries if id(e) not in drop]
    entry: dict[str, Any] = {"at": now.isoformat(), "what": what}
    if done is not None:
        entry["done"] = done
    entries.append(entry)
    job.log = entries  # a new list: SQLAlchemy sees a JSON column change only so


class JobCancelled(Exception):
    pass


class JobHandle(Generic[P]):
    """What a running flow sees of its job: its parameters, typed."""

    def __init__(self, runner: JobRunner, job_id: str, vm_id: str | None, params: P) -> None:
        self.runner = runner
        self.id = job_id
        self.vm_id = vm_id
        self.params = params

    def update(
        self,
        step: str | None = None,
        progress: dict[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        """`params` are the keys to change (the others stay as stored)."""
        merged = self.runner.update(self.id, step=step, progress=progress, params=params)
        if merged is not None:
            self.params = cast(P, merged)

    @property
    def cancel_requested(self) -> bool:
        return self.runner.cancel_requested(self.id)

    def check_cancel(self) -> None:
        if self.cancel_requested:
            raise JobCancelled()


Flow = Callable[["EngineContext", JobHandle[Any]], None]


def _key(job_id: str) -> str:
    return f"job:{job_id}"


def to_model(job: Job) -> models.Job:
    return models.Job(
        id=job.id,
        kind=job.kind,
        vm_id=job.vm_id,
        state=job.state,
        step=job.step,
        params=job.params,
        cancel_requested=job.cancel_requested,
        progress=job.progress,
        error=job.error,
        created_at=aware(job.created_at),
        updated_at=aware(job.updated_at),
        finished_at=aware(job.finished_at),
        log=[models.JobEvent.model_validate(e) for e in job.log or []],
    )


class JobRunner:
    def __init__(self, ctx: EngineContext, poll_interval: float = 5.0) -> None:
        self.ctx = ctx
        self.flows: dict[str, Flow] = {}
        self.param_models: dict[str, type[JobParams]] = {}  # each flow's params
        self._threads: dict[str, threading.Thread] = {}
        self._changed = threading.Condition()
        # One check-then-insert at a time, so two requests at the same instant
        # cannot both find the VM free.
        self._submitting = threading.Lock()
        self.poll_interval = poll_interval
        self._stopping = threading.Event()
        self._poller: threading.Thread | None = None

    # -- submitting and running ----------------------------------------------

    def register(
        self, kind: str, flow: Callable[[EngineContext, JobHandle[P]], None], params: type[P]
    ) -> None:
        self.flows[kind] = flow
        self.param_models[kind] = params

    def submit(self, kind: str, vm_id: str | None, params: JobParams) -> models.Job:
        if not isinstance(params, self.param_models[kind]):
            raise TypeError(f"a {kind} job takes {self.param_models[kind].__name__}")
        job_id = new_id()
        if not self.ctx.db.locks.try_lock(_key(job_id)):  # pragma: no cover - a fresh uuid
            raise Conflict(f"job {job_id} is taken")
        try:
            with self._submitting, self.ctx.db.session() as s:
                if vm_id is not None:
                    busy = s.scalar(select(Job).where(Job.vm_id == vm_id, Job.state.in_(ACTIVE)))
                    if busy is not None:
                        raise Conflict(
                            f"job {busy.id} ({busy.kind}) is already running for this VM"
                        )
                job = Job(
                    id=job_id,
                    kind=kind,
                    vm_id=vm_id,
                    params=params.model_dump(mode="json"),
                    progress={},
                    state=JobState.PENDING,
                )
                s.add(job)
                s.flush()
                model = to_model(job)
        except BaseException:
            self.ctx.db.locks.unlock(_key(job_id))
            raise
        self._start_thread(model.id)
        return model

    def resume_all(self) -> list[str]:
        """Run every job left pending or running that no engine runs now (an
        earlier engine died, or another engine on the database did)."""
        with self.ctx.db.session() as s:
            ids = list(s.scalars(select(Job.id).where(Job.state.in_(ACTIVE))))
        taken = []
        for job_id in ids:
            if job_id in self._threads or not self._claim(job_id):
                continue
            log.info("resuming job %s", job_id)
            self._start_thread(job_id)
            taken.append(job_id)
        return taken

    def _claim(self, job_id: str) -> bool:
        """Take the job's lock if it is still to be run and nobody runs it."""
        if not self.ctx.db.locks.try_lock(_key(job_id)):
            return False
        with self.ctx.db.session() as s:  # it may have ended since we listed it
            state = s.scalar(select(Job.state).where(Job.id == job_id))
        if state not in ACTIVE:
            self.ctx.db.locks.unlock(_key(job_id))
            return False
        return True

    def start_polling(self) -> None:
        """Pick up, every poll_interval seconds, the jobs nobody runs."""

        def loop() -> None:
            while not self._stopping.wait(self.poll_interval):
                try:
                    self.resume_all()
                except Exception:  # the database may be restarting: try again later
                    log.exception("looking for jobs to resume failed")

        self._poller = threading.Thread(target=loop, name="job-poller", daemon=True)
        self._poller.start()

    def stop_polling(self) -> None:
        self._stopping.set()
        if self._poller is not None:
            self._poller.join()

    def _start_thread(self, job_id: str) -> None:
        thread = threading.Thread(
            target=self._run, args=(job_id,), name=f"job-{job_id[:8]}", daemon=True
        )
        self._threads[job_id] = thread
        thread.start()

    def _run(self, job_id: str) -> None:
        with self.ctx.db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            job.state = move(job.state, JobState.RUNNING)
            job.updated_at = utcnow()
            _log(job, "resumed" if job.log else "running")
            kind, vm_id, stored = job.kind, job.vm_id, dict(job.params)
            flow = self.flows[kind]
        self._notify(job_id)
        state, error = JobState.SUCCEEDED, None
        try:
            handle = JobHandle(self, job_id, vm_id, self.param_models[kind].model_validate(stored))
            flow(self.ctx, handle)
        except JobCancelled:
            state = JobState.CANCELLED
        except ThinairError as e:
            state, error = JobState.FAILED, e.message
        except Exception as e:  # a bug or an unexpected tool failure: keep the reason
            log.exception("job %s failed", job_id)
            state, error = JobState.FAILED, f"{type(e).__name__}: {e}"
        log.info("job %s %s%s", job_id, state, f": {error}" if error else "")
        try:
            with self.ctx.db.session() as s:
                job = s.get(Job, job_id)
                if job is not None:
                    job.state, job.error = move(job.state, state), error
                    job.updated_at = job.finished_at = utcnow()
                    _log(job, f"{state}: {error}" if error else state)
        finally:  # ended (or left for another engine to run again)
            self.ctx.db.locks.unlock(_key(job_id))
            self._threads.pop(job_id, None)
        self._notify(job_id)

    # -- state ---------------------------------------------------------------

    def update(
        self,
        job_id: str,
        step: str | None = None,
        progress: dict[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> JobParams | None:
        """Write a step, progress, or some of the params' keys (merged into the
        stored ones, checked against the flow's model). Returns the params as
        they are now, if any were given and the job is still there. The running
        flow is the params' only writer; a cancel goes to its own column, which
        this UPDATE does not name, so neither can erase the other."""
        merged = None
        # Progress alone may be lost with the host: it is written without a sync.
        with self.ctx.db.session(durable=step is not None or params is not None) as s:
            job = s.get(Job, job_id)
            if job is None:
                return None
            if params is not None:
                merged = self.param_models[job.kind].model_validate({**job.params, **params})
                job.params = merged.model_dump(mode="json")
            if progress is not None:
                job.progress = progress
            if step is not None and step != job.step:
                _log(job, step)
            if step is not None:
                job.step = step
            if progress is not None:
                _log(job, None, sample=True)
            job.updated_at = utcnow()
        self._notify(job_id)
        return merged

    def _notify(self, job_id: str) -> None:
        with self._changed:
            self._changed.notify_all()
        with contextlib.suppress(NotFound):
            self.ctx.events.publish("job", self.get(job_id).model_dump(mode="json"))

    def resolve(self, ref: str) -> str:
        """The id of the job whose id is `ref` or starts with it (unique)."""
        with self.ctx.db.session() as s:
            return refs.find(s, Job, ref, "job").id

    def cancel(self, job_id: str) -> models.Job:
        job_id = self.resolve(job_id)
        with self.ctx.db.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise NotFound(f"no job {job_id!r}")
            if job.state not in ACTIVE:
                raise Conflict(f"job {job_id} is {job.state} already")
            job.cancel_requested = True
            job.updated_at = utcnow()
        self._notify(job_id)
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        with self.ctx.db.session() as s:
            job = s.get(Job, job_id)
            return bool(job and job.cancel_requested)

    def active_for_vm(self, vm_id: str) -> str | None:
        with self.ctx.db.session() as s:
            return s.scalar(select(Job.id).where(Job.vm_id == vm_id, Job.state.in_(ACTIVE)))

    def cancel_and_wait(self, vm_id: str, timeout: float = 120) -> None:
        """Cancel the VM's active job, if any, and wait for it to end."""
        job_id = self.active_for_vm(vm_id)
        if job_id is None:
            return
        self.cancel(job_id)
        if not self.wait(job_id, lambda j: j.state not in ACTIVE, timeout):
            raise Conflict(f"job {job_id} did not stop within {timeout:g} s")

    def get(self, job_id: str) -> models.Job:
        """By id or a unique prefix of it."""
        with self.ctx.db.session() as s:
            job = s.get(Job, job_id) or refs.find(s, Job, job_id, "job")
            return to_model(job)

    def list(self, vm_id: str | None = None) -> list[models.Job]:
        with self.ctx.db.session() as s:
            query = select(Job).order_by(Job.created_at.desc())
            if vm_id:
                query = query.where(Job.vm_id == vm_id)
            return [to_model(j) for j in s.scalars(query)]

    def wait(self, job_id: str, until: Callable[[models.Job], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if until(self.get(job_id)):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._changed:
                self._changed.wait(min(remaining, 1.0))

    def wait_change(self, job_id: str, since: datetime | None, timeout: float) -> models.Job:
        """Long-poll: the job once it changed after `since` (or ended), or as it is
        when `timeout` runs out. A `since` with no time zone is UTC."""
        job_id = self.resolve(job_id)
        since = aware(since)
        self.wait(
            job_id,
            lambda j: since is None or j.updated_at > since or j.state not in ACTIVE,
            timeout,
        )
        return self.get(job_id)
