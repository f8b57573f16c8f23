#!/usr/bin/env bash
# Set up (if needed) and run the quickstart on embedded defaults. Extra arguments go to
# `epiray quickstart` (e.g. --preset tiny, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/epiray ] || bash scripts/setup.sh
exec .venv/bin/epiray quickstart "$@"
