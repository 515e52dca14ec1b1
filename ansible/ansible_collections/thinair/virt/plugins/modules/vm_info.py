#!/usr/bin/python
# Copyright: thinair developers
# Apache License 2.0 (see the repository's LICENSE)
"""Ansible module: facts about thinair VMs."""

from __future__ import annotations

DOCUMENTATION = r"""
module: vm_info
short_description: Facts about thinair VMs (state, phase, where each disk's data is)
version_added: 0.1.0
description:
  - Lists the engine's VMs, or the one named.
options:
  name:
    description: Only this VM (none when there is no VM of that name).
    type: str
extends_documentation_fragment:
  - thinair.virt.connection
  - thinair.virt.attributes.info_module
author:
  - thinair developers
"""

EXAMPLES = r"""
- thinair.virt.vm_info:
    name: web1
  register: web1

- ansible.builtin.assert:
    that: web1.vms[0].disks | map(attribute='location') | unique == ['local']
"""

RETURN = r"""
vms:
  description: The VMs as the engine shows them.
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
        argument_spec=argument_spec(name={"type": "str"}), supports_check_mode=True
    )
    name = module.params["name"]

    def body(c: Any) -> dict[str, Any]:
        vms = [vm for vm in c.vms.list() if name in (None, vm.name)]
        return {"changed": False, "vms": dump(vms)}

    run(module, body)


if __name__ == "__main__":
    main()
