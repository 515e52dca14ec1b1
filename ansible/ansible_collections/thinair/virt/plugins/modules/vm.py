#!/usr/bin/python
# Copyright: thinair developers
# Apache License 2.0 (see the repository's LICENSE)
"""Ansible module: a thinair VM, from created to imported or rolled back."""

from __future__ import annotations

DOCUMENTATION = r"""
module: vm
short_description: A thinair VM running out of thin air, imported or rolled back
version_added: 0.1.0
description:
  - Creates a VM on external disks (a temporary qcow2 disk over each remote image),
    starts and stops it, imports it (copies its data home while it runs, then
    switches to the local copy), rolls it back (discards the temporary disks) or
    removes it.
  - Each state is reached from wherever the VM is, and nothing is done when it is
    there already. thinair cannot change an existing VM's memory, CPUs or disks;
    a difference is an error.
options:
  name:
    description: The VM's name.
    type: str
    required: true
  state:
    description:
      - V(present) the VM exists (created stopped when missing).
      - V(running) it exists and runs; V(stopped) it exists and does not run.
      - V(imported) it exists and no disk is external any more (an import to
        O(to) is started, or one in progress is followed).
      - V(rolled_back) the VM and its temporary disks are gone; the external
        disks were never written. An imported VM cannot be rolled back (use V(absent)).
      - V(absent) the VM is removed.
    type: str
    choices: [present, running, stopped, imported, rolled_back, absent]
    default: present
  disks:
    description:
      - The disks of a VM to create, each as the CLI's C(--disk) spec
        (C(URL[,format=F][,storage=SD][,check-readonly=off]) or C(size=N[,storage=SD]))
        or as a dict with C(url), C(format), C(storage), C(check_readonly) or C(size).
    type: list
    elements: raw
  memory:
    description: MiB of memory of a VM to create.
    type: int
  cpus:
    description: Virtual CPUs of a VM to create.
    type: int
  host:
    description: The host to create or start the VM on; omitted, the engine chooses.
    type: str
  to:
    description: The storage domain to import to; needed for O(state=imported).
    type: str
  strategy:
    description: How to import (see C(thinair vm import --strategy)).
    type: str
    choices: [stream, mirror]
  bandwidth:
    description: MiB/s the import may copy at; omitted, as fast as it goes.
    type: float
  force:
    description: Stop by powering off (V(stopped)), or remove a running VM (V(absent)).
    type: bool
    default: false
  wait:
    description:
      - Wait for an import to end. Without, the task returns the job at once
        (follow it with M(thinair.virt.job_info)).
    type: bool
    default: true
  timeout:
    description: Seconds to wait for an import (or a graceful stop) before failing.
    type: float
    default: 3600
extends_documentation_fragment:
  - thinair.virt.connection
  - thinair.virt.attributes
author:
  - thinair developers
"""

EXAMPLES = r"""
- name: Run web1 from another host's export
  thinair.virt.vm:
    name: web1
    state: running
    memory: 1024
    disks:
      - nbd://other-host:10809/web1,format=raw,storage=tmp

- name: Keep it
  thinair.virt.vm:
    name: web1
    state: imported
    to: final
    timeout: 7200
"""

RETURN = r"""
vm:
  description: The VM as the engine shows it (none once rolled back or absent).
  returned: always
  type: dict
job:
  description: The import's job, when the task started or followed one.
  returned: when an import ran
  type: dict
"""

from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.thinair.virt.plugins.module_utils.thinair import (
    argument_spec,
    dump,
    find,
    run,
)

ACTIVE = ("pending", "running")


def disk_spec(disk: Any) -> str:
    """A dict disk as the CLI's --disk spec (the SDK parses that)."""
    if isinstance(disk, str):
        return disk
    if not isinstance(disk, dict):
        raise ValueError(f"a disk is a --disk string or a dict, not {disk!r}")
    unknown = set(disk) - {"url", "format", "storage", "check_readonly", "size"}
    if unknown:
        raise ValueError(f"unknown disk keys: {', '.join(sorted(unknown))}")
    if ("url" in disk) == ("size" in disk):
        raise ValueError("a disk has either url or size")
    parts = [str(disk["url"])] if "url" in disk else [f"size={disk['size']}"]
    if disk.get("format"):
        parts.append(f"format={disk['format']}")
    if disk.get("storage"):
        parts.append(f"storage={disk['storage']}")
    if disk.get("check_readonly") is False:
        parts.append("check-readonly=off")
    return ",".join(parts)


def view(vm: Any) -> dict[str, Any]:
    """What --diff shows of a VM."""
    if vm is None:
        return {}
    return {
        "name": vm.name,
        "state": vm.state,
        "memory_mib": vm.memory_mib,
        "cpus": vm.cpus,
        "disks": {d.target: d.location for d in vm.disks},
    }


def main() -> None:
    states = ["present", "running", "stopped", "imported", "rolled_back", "absent"]
    module = AnsibleModule(
        argument_spec=argument_spec(
            name={"type": "str", "required": True},
            state={"type": "str", "choices": states, "default": "present"},
            disks={"type": "list", "elements": "raw"},
            memory={"type": "int"},
            cpus={"type": "int"},
            host={"type": "str"},
            to={"type": "str"},
            strategy={"type": "str", "choices": ["stream", "mirror"]},
            bandwidth={"type": "float"},
            force={"type": "bool", "default": False},
            wait={"type": "bool", "default": True},
            timeout={"type": "float", "default": 3600.0},
        ),
        required_if=[("state", "imported", ["to"])],
        supports_check_mode=True,
    )
    p = module.params
    check = module.check_mode

    def body(c: Any) -> dict[str, Any]:
        vm = find(c.vms.list(), p["name"])
        before = view(vm)
        changed = False
        job = None

        def result() -> dict[str, Any]:
            now = vm if check or vm is None else c.vms.get(vm.name)
            out: dict[str, Any] = {"changed": changed, "vm": dump(now)}
            if job is not None:
                out["job"] = dump(job)
            if changed:
                after = planned if check else view(now)
                out["diff"] = {"before": before, "after": after}
            return out

        planned = dict(before)
        if p["state"] in ("absent", "rolled_back"):
            if vm is None:
                return result()
            changed, planned = True, {}
            if not check:
                if p["state"] == "absent":
                    c.vms.remove(vm.name, force=p["force"])
                else:
                    c.vms.rollback(vm.name)
            vm = None
            return result()

        if vm is None:
            if not p["disks"]:
                if check:  # an earlier task of the play would have created it
                    changed, planned = True, {"name": p["name"], "state": p["state"]}
                    module.warn(f"no VM {p['name']!r} yet: assuming an earlier task creates it")
                    return result()
                module.fail_json(msg=f"no VM {p['name']!r}: give its disks to create it")
            try:
                specs = [disk_spec(d) for d in p["disks"]]
            except ValueError as e:
                module.fail_json(msg=str(e))
            changed = True
            planned = {
                "name": p["name"],
                "state": "stopped",
                "memory_mib": p["memory"],
                "cpus": p["cpus"],
                "disks": specs,
            }
            if check:
                planned["state"] = "running" if p["state"] == "running" else "stopped"
                return result()
            vm = c.vms.create(
                p["name"], disks=specs, memory_mib=p["memory"], cpus=p["cpus"], host=p["host"]
            )
        else:
            for option, field in (("memory", "memory_mib"), ("cpus", "cpus")):
                if p[option] is not None and p[option] != getattr(vm, field):
                    module.fail_json(
                        msg=f"{vm.name} has {field} {getattr(vm, field)}, not {p[option]}: "
                        "thinair does not change an existing VM (remove it first)"
                    )

        if p["state"] == "running" and vm.state != "running":
            changed, planned["state"] = True, "running"
            if not check:
                vm = c.vms.start(vm.name, host=p["host"])
        elif p["state"] == "stopped" and vm.state not in ("stopped", "shutoff"):
            changed, planned["state"] = True, "stopped"
            if not check:
                timeout = None if p["force"] else min(p["timeout"], 3600)
                vm = c.vms.stop(vm.name, force=p["force"], timeout=timeout)
        elif p["state"] == "imported":
            running = [j for j in c.jobs.list(vm=vm.id) if j.kind == "import" and j.state in ACTIVE]
            external = [d for d in vm.disks if d.location == "external"]
            if running:
                job = running[0]  # one already under way: follow it, start none
            elif external:
                changed = True
                planned["disks"] = {d.target: "local" for d in vm.disks}
                if check:
                    return result()
                job = c.vms.import_(
                    vm.name, to=p["to"], strategy=p["strategy"], bandwidth_mib=p["bandwidth"]
                )
            if job is not None and p["wait"]:
                job = c.jobs.wait(job.id, timeout=p["timeout"])
                if job.state != "succeeded":
                    module.fail_json(
                        msg=f"import of {vm.name} {job.state}: {job.error or job.step}",
                        job=dump(job),
                    )
                changed = True
        return result()

    run(module, body)


if __name__ == "__main__":
    main()
