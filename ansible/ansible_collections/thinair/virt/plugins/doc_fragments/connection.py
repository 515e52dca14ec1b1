# Copyright: thinair developers
# Apache License 2.0 (see the repository's LICENSE)
"""The connection options every thinair module takes."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  url:
    description:
      - Where the thinair engine answers, for example C(http://127.0.0.1:8470).
      - Taken from the E(THINAIR_URL) environment variable when not given.
    type: str
  token:
    description:
      - An API token of the engine (C(thinair token create NAME)).
      - Taken from E(THINAIR_TOKEN) when not given; on the engine's own machine
        the admin token in E(THINAIR_HOME)/token is used as a last resort.
    type: str
  api_timeout:
    description:
      - Seconds to wait for one answer of the engine.
    type: float
    default: 600
requirements:
  - the thinair Python SDK (C(pip install thinair)) on the host that runs the module
notes:
  - Errors are the engine's own one-line messages.
"""
