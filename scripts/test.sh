#!/usr/bin/env bash
# Set up (if needed) and run the default test suite (excludes tests marked slow).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] || bash scripts/setup.sh
exec .venv/bin/python -m pytest -m "not slow" "$@"
