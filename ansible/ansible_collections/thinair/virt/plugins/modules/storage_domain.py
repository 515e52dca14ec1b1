#!/usr/bin/python
# Copyright: thinair developers
# Apache License 2.0 (see the repository's LICENSE)
"""Ansible module: a thinair storage domain, present or absent."""

from __future__ import annotations

DOCUMENTATION = r"""
module: storage_domain
short_description: A thinair storage domain (a directory where volumes live)
version_added: 0.1.0
description:
  - Adds a storage domain to the engine (C(thinair storage add NAME PATH)) or removes it.
  - An existing domain of that name at another path is an error, never changed.
options:
  name:
    description: The storage domain's name.
    type: str
    required: true
  path:
    description: An existing directory on the engine's host; needed for O(state=present).
    type: str
  host:
    description: The one host that reaches it; omitted, every host does (shared storage).
    type: str
  state:
    description: Whether the domain is there.
    type: str
    choices: [present, absent]
    default: present
extends_documentation_fragment:
  - thinair.virt.connection
  - thinair.virt.attributes
author:
  - thinair developers
"""

EXAMPLES = r"""
- name: Temporary disks go to /srv/thinair/tmp
  thinair.virt.storage_domain:
    name: tmp
    path: /srv/thinair/tmp
"""

RETURN = r"""
storage_domain:
  description: The storage domain as the engine shows it (none once absent).
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.thinair.virt.plugins.module_utils.thinair import (
    argument_spec,
    dump,
    find,
    run,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec=argument_spec(
            name={"type": "str", "required": True},
            path={"type": "str"},
            host={"type": "str"},
            state={"type": "str", "choices": ["present", "absent"], "default": "present"},
        ),
        required_if=[("state", "present", ["path"])],
        supports_check_mode=True,
    )
    p = module.params

    def body(c):  # type: ignore[no-untyped-def]
        current = find(c.storage_domains.list(), p["name"])
        before = {"name": current.name, "path": current.path} if current else {}
        if p["state"] == "absent":
            if current is None:
                return {"changed": False, "storage_domain": None}
            if not module.check_mode:
                c.storage_domains.remove(p["name"])
            return {
                "changed": True,
                "storage_domain": None,
                "diff": {"before": before, "after": {}},
            }
        if current is not None:
            if current.path.rstrip("/") != p["path"].rstrip("/"):
                module.fail_json(
                    msg=f"storage domain {p['name']!r} exists at {current.path}, not {p['path']}: "
                    "remove it first (state=absent)"
                )
            return {"changed": False, "storage_domain": dump(current)}
        after = {"name": p["name"], "path": p["path"]}
        made = None if module.check_mode else c.storage_domains.add(p["name"], p["path"], p["host"])
        return {
            "changed": True,
            "storage_domain": dump(made),
            "diff": {"before": {}, "after": after},
        }

    run(module, body)


if __name__ == "__main__":
    main()
