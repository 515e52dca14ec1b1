#!/usr/bin/env bash
# Set the machine up (scripts/setup.sh), then run the test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not guest"`.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
"$top/scripts/setup.sh"
cd "$top"
.venv/bin/ruff check thinair tests bench examples ansible
.venv/bin/mypy thinair tests examples bench
exec .venv/bin/pytest -m "not slow" "$@"
