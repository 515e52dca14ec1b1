#!/usr/bin/python
# Copyright: thinair developers
# Apache License 2.0 (see the repository's LICENSE)
"""Ansible module: a thinair export (a read-only NBD or HTTP server for an image)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: export
short_description: A read-only NBD or HTTP server the thinair engine runs for an image
version_added: 0.1.0
description:
  - Exposes an image (C(thinair expose)), or a point-in-time copy of a running
    VM's disk, so that other hosts can run VMs from it; or stops the export.
  - Exports are named; an export of that name for another image is an error.
options:
  name:
    description: The export's name (its NBD export name).
    type: str
    required: true
  image:
    description: The image to serve (a path the engine may read).
    type: str
  vm:
    description: Serve a point-in-time copy of this running VM's disk instead of O(image).
    type: str
  disk:
    description: With O(vm), the disk's target (C(vda)).
    type: str
  format:
    description: The image's format; probed when omitted.
    type: str
  protocol:
    description: How it is served.
    type: str
    choices: [nbd, http]
    default: nbd
  listen:
    description: HOST[:PORT] to serve on; omitted, the engine chooses.
    type: str
  unix:
    description: Serve on this Unix socket instead.
    type: str
  tls:
    description: TLS for NBD.
    type: str
    choices: [none, psk, x509]
    default: none
  tls_dir:
    description: Use these credentials instead of making new ones.
    type: path
  shared:
    description: Clients served at once.
    type: int
    default: 16
  state:
    description: Whether the export runs.
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
- name: Serve the golden template to the other hosts
  thinair.virt.export:
    name: golden
    image: /srv/images/golden.qcow2
    listen: 0.0.0.0:10809
    tls: psk
  register: golden

- ansible.builtin.debug:
    msg: "run VMs from {{ golden.export.url }}"
"""

RETURN = r"""
export:
  description: The export as the engine shows it (its C(url) for clients; none once absent).
  returned: always
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


def main() -> None:
    module = AnsibleModule(
        argument_spec=argument_spec(
            name={"type": "str", "required": True},
            image={"type": "str"},
            vm={"type": "str"},
            disk={"type": "str"},
            format={"type": "str"},
            protocol={"type": "str", "choices": ["nbd", "http"], "default": "nbd"},
            listen={"type": "str"},
            unix={"type": "str"},
            tls={"type": "str", "choices": ["none", "psk", "x509"], "default": "none"},
            tls_dir={"type": "path"},
            shared={"type": "int", "default": 16},
            state={"type": "str", "choices": ["present", "absent"], "default": "present"},
        ),
        mutually_exclusive=[("image", "vm"), ("listen", "unix")],
        required_by={"disk": "vm"},
        supports_check_mode=True,
    )
    p = module.params

    def body(c: Any) -> dict[str, Any]:
        current = find(c.exports.list(), p["name"])
        before = {"name": current.name, "image": current.image} if current else {}
        if p["state"] == "absent":
            if current is None:
                return {"changed": False, "export": None}
            if not module.check_mode:
                c.exports.remove(current.id)
            return {"changed": True, "export": None, "diff": {"before": before, "after": {}}}
        if current is not None:
            if p["image"] and current.image != p["image"]:
                module.fail_json(
                    msg=f"export {p['name']!r} serves {current.image}, not {p['image']}: "
                    "remove it first (state=absent)"
                )
            return {"changed": False, "export": dump(current)}
        if not p["image"] and not p["vm"]:
            module.fail_json(msg=f"no export {p['name']!r}: give its image (or vm) to create it")
        after = {"name": p["name"], "image": p["image"] or f"{p['vm']}:{p['disk'] or ''}"}
        made = None
        if not module.check_mode:
            made = c.exports.create(
                image=p["image"],
                vm=p["vm"],
                disk=p["disk"],
                format=p["format"],
                name=p["name"],
                protocol=p["protocol"],
                listen=p["listen"],
                unix=p["unix"],
                tls=p["tls"],
                tls_dir=p["tls_dir"],
                shared=p["shared"],
            )
        return {"changed": True, "export": dump(made), "diff": {"before": {}, "after": after}}

    run(module, body)


if __name__ == "__main__":
    main()
