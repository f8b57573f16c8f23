#!/usr/bin/env bash
# Create .venv and install epiray with its test extra. torch==2.13.0 goes first: that exact
# version is a local CPU wheel here; an unpinned torch would pull gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi

# pip, quiet: errors and real warnings still show, and pip's exit status is kept (pipefail).
# Two kinds of noise are dropped, nothing else:
#  - "WARNING: Location 'file:///…/simple/<pkg>/' is ignored: it is neither a file nor a
#    directory." — one line per package when the machine's pip config lists local file://
#    indexes that do not carry that package (harmless: pip falls through to the next index);
#  - setuptools' "Editable installation." note, printed by every `pip install -e` of a
#    flat-layout project (informational, not a deprecation).
pip_quiet() {
  PYTHONWARNINGS="ignore:Editable installation:UserWarning" \
    .venv/bin/python -m pip --disable-pip-version-check install -q "$@" 2>&1 |
    { grep -v -E "^WARNING: Location 'file://[^']*' is ignored: it is neither a file nor a directory\.$" || true; }
}

pip_quiet --upgrade pip
pip_quiet "torch==2.13.0"
pip_quiet -e ".[test]"
