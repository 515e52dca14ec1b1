#!/usr/bin/python
# Copyright: thinair developers
# Apache License 2.0 (see the repository's LICENSE)
"""Ansible module: facts about thinair jobs (imports, conversions)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: job_info
short_description: Facts about thinair jobs (imports, conversions) and their progress
version_added: 0.1.0
description:
  - Lists the engine's jobs, those of one VM, or the one with an id; optionally
    waits for that one to end.
options:
  id:
    description: Only this job.
    type: str
  vm:
    description: Only the jobs of this VM (its name or id).
    type: str
  wait:
    description: With O(id), wait until the job ends (or O(timeout) passes).
    type: bool
    default: false
  timeout:
    description: Seconds to wait with O(wait).
    type: float
    default: 3600
extends_documentation_fragment:
  - thinair.virt.connection
  - thinair.virt.attributes.info_module
author:
  - thinair developers
"""

EXAMPLES = r"""
- thinair.virt.vm:
    name: web1
    state: imported
    to: final
    wait: false
  register: started

- thinair.virt.job_info:
    id: "{{ started.job.id }}"
    wait: true
  register: done
"""

RETURN = r"""
jobs:
  description:
    - The jobs, each with its C(state), C(step) and C(progress)
      (C(done), C(total), C(rate); bytes copied, to copy, and per second).
  returned: always
  type: list
  elements: dict
"""

from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.thinair.virt.plugins.module_utils.thinair import (
    argument_spec,
    dump,
    run,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec=argument_spec(
            id={"type": "str"},
            vm={"type": "str"},
            wait={"type": "bool", "default": False},
            timeout={"type": "float", "default": 3600.0},
        ),
        mutually_exclusive=[("id", "vm")],
        required_if=[("wait", True, ["id"])],
        supports_check_mode=True,
    )
    p = module.params

    def body(c: Any) -> dict[str, Any]:
        if p["id"]:
            job = c.jobs.wait(p["id"], timeout=p["timeout"]) if p["wait"] else c.jobs.get(p["id"])
            return {"changed": False, "jobs": dump([job])}
        vm = c.vms.get(p["vm"]).id if p["vm"] else None
        return {"changed": False, "jobs": dump(c.jobs.list(vm=vm))}

    run(module, body)


if __name__ == "__main__":
    main()
