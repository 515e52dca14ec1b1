"""Conversion: virt-v2v in place over a new VM's temporary disks, as a job.

`vm create --convert` creates the overlays and the domain as usual, leaves the
VM in phase `converting` and submits a `convert` job: virt-v2v-in-place runs
over the overlays (so it writes only there; the external disks stay untouched),
then the VM becomes ready. A conversion that fails, or is cancelled, undoes the
create and keeps virt-v2v's log (THINAIR_HOME/v2v/NAME.log) for the user. An
engine that dies mid-conversion runs the job again on fresh overlays (virt-v2v
may have left them half converted); a VM left converting with no job is undone.
"""

from __future__ import annotations

import time

from sqlalchemy import select

from thinair.adapters import v2v
from thinair.db.models import Job, Vm
from thinair.engine import machines
from thinair.engine.context import EngineContext
from thinair.engine.faults import crash_point
from thinair.engine.jobs import JobCancelled, JobHandle, JobRunner
from thinair.errors import BackendError, InvalidInput

KIND = "convert"


def check_available(ctx: EngineContext) -> None:
    if not v2v.available():
        raise InvalidInput(
            f"{v2v.TOOL} is not installed on the engine's host: "
            "install Debian's virt-v2v package (and a kernel in /boot for libguestfs)"
        )


def submit(ctx: EngineContext, vm_id: str) -> None:
    ctx.jobs.submit(KIND, vm_id, {})


def run(ctx: EngineContext, job: JobHandle) -> None:
    assert job.vm_id is not None
    vm_id = job.vm_id
    with ctx.db.session() as s:
        vm = s.get(Vm, vm_id)
        if vm is None or vm.phase != "converting":
            raise BackendError("the VM to convert is gone (rolled back or removed)")
        name = vm.name
    began = time.monotonic()
    path = machines.conversion_log(ctx, name)
    try:
        with ctx.vm_busy(vm_id, "conversion"):
            with ctx.db.session() as s:
                vm = machines.find(s, vm_id)
                if job.params.get("began"):
                    # An engine died mid-conversion: start again from the source.
                    job.update(step="new temporary disks")
                    v2v.stop_leftover(path)
                    for disk in vm.disks:
                        machines.create_overlay(ctx, disk)
                disks = [v2v.Disk(d.volume_path, d.volume_format) for d in vm.disks]
                memory_mib, cpus = vm.memory_mib, vm.cpus
            job.update(step="converting", params={**job.params, "began": True, "log": str(path)})
            last_check = 0.0

            def should_stop() -> bool:
                nonlocal last_check
                now = time.monotonic()
                if now - last_check < 1:
                    return False
                last_check = now
                return job.cancel_requested

            def on_step(step: str) -> None:
                job.update(
                    step=f"virt-v2v: {step}",
                    progress={"elapsed": round(time.monotonic() - began, 1)},
                )
                if step.startswith("Converting"):
                    crash_point("convert-running")

            v2v.convert_in_place(
                name,
                memory_mib,
                cpus,
                disks,
                path,
                tcg=vm_domain_type(ctx, vm_id) == "qemu",
                on_step=on_step,
                should_stop=should_stop,
            )
            with ctx.db.session() as s:
                machines.find(s, vm_id).phase = "ready"
        job.update(step="converted", progress={"elapsed": round(time.monotonic() - began, 1)})
    except v2v.ConversionFailed as e:
        machines.destroy(ctx, vm_id, keep_conversion_log=True)
        if e.returncode is None:
            raise JobCancelled() from e
        raise BackendError(
            f"virt-v2v could not convert {name} (exit {e.returncode}); the VM was not "
            f"created. It said:\n{e.summary}\nIts log: {path}"
        ) from e
    except JobCancelled:
        machines.destroy(ctx, vm_id, keep_conversion_log=True)
        raise
    except Exception:
        machines.destroy(ctx, vm_id, keep_conversion_log=True)
        raise


def vm_domain_type(ctx: EngineContext, vm_id: str) -> str:
    with ctx.db.session() as s:
        return machines.find(s, vm_id).domain_type


def orphans(ctx: EngineContext) -> list[str]:
    """VMs left converting with no job to convert them (the engine died between
    the create and the job's submission)."""
    with ctx.db.session() as s:
        converting = set(s.scalars(select(Vm.id).where(Vm.phase == "converting")))
        jobs = set(
            s.scalars(
                select(Job.vm_id).where(Job.kind == KIND, Job.state.in_(("pending", "running")))
            )
        )
    return sorted(converting - jobs)


def register(runner: JobRunner) -> None:
    runner.flows[KIND] = run
