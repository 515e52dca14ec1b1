# Copyright: thinair developers
# Apache License 2.0 (see the repository's LICENSE)
"""What every thinair module shares: the connection options, the SDK client,
and the engine's errors as one-line failures."""

from __future__ import annotations

import traceback
from typing import Any

from ansible.module_utils.basic import AnsibleModule, env_fallback, missing_required_lib

try:
    from thinair.client import Client, ThinairAPIError

    HAS_THINAIR = True
    IMPORT_ERROR = ""
except ImportError:
    HAS_THINAIR = False
    IMPORT_ERROR = traceback.format_exc()

CONNECTION_SPEC: dict[str, Any] = {
    "url": {"type": "str", "fallback": (env_fallback, ["THINAIR_URL"])},
    "token": {"type": "str", "no_log": True, "fallback": (env_fallback, ["THINAIR_TOKEN"])},
    "api_timeout": {"type": "float", "default": 600.0},
}


def argument_spec(**options: Any) -> dict[str, Any]:
    return {**CONNECTION_SPEC, **options}


def client(module: AnsibleModule) -> Any:
    """The SDK's client for the engine the module's options (or environment) name."""
    if not HAS_THINAIR:
        module.fail_json(msg=missing_required_lib("thinair"), exception=IMPORT_ERROR)
    p = module.params
    return Client(url=p["url"], token=p["token"], timeout=p["api_timeout"])


def dump(model: Any) -> Any:
    """A model of the SDK as plain JSON data for the module's result."""
    if isinstance(model, list):
        return [dump(m) for m in model]
    return model.model_dump(mode="json") if model is not None else None


def find(items: list[Any], name: str) -> Any:
    return next((i for i in items if i.name == name), None)


def run(module: AnsibleModule, body: Any) -> None:
    """Call body(client) -> result dict; the engine's errors fail the task with
    the engine's message (and its error code)."""
    c = client(module)
    try:
        result = body(c)
    except ThinairAPIError as e:
        module.fail_json(msg=e.message, code=e.code)
    finally:
        c.close()
    module.exit_json(**result)
