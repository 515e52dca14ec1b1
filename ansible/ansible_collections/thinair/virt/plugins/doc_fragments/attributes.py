# Copyright: thinair developers
# Apache License 2.0 (see the repository's LICENSE)
"""What the thinair modules support: check and diff modes (info modules: check)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
attributes:
  check_mode:
    description: Reports what would change and changes nothing.
    support: full
  diff_mode:
    description: Shows the resource before and after.
    support: full
"""

    INFO_MODULE = r"""
attributes:
  check_mode:
    description: Only reads, so it runs the same.
    support: full
"""
