#!/usr/bin/env bash
# Create the Python 3.8 venv that runs the ORIGINAL Avocado (avocado-epigenome 0.4.1,
# Keras 2.3.1 + Theano 1.0.5, CPU) for benchmarks/original_avocado/run_original.py.
#
#   bash benchmarks/original_avocado/setup.sh            # -> benchmarks/_work/avocado38
#   AVOCADO38_VENV=/some/dir bash benchmarks/original_avocado/setup.sh
#   AVOCADO38_PYTHON=/path/to/python3.8 bash ...          # default: pyenv's 3.8.18
#
# The venv lives outside the package (benchmarks/_work/ is gitignored). Idempotent: an existing
# venv that already imports avocado is kept. Needs g++ (Theano compiles its C ops at first use).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${AVOCADO38_VENV:-$repo/benchmarks/_work/avocado38}"

find_python() {
    if [[ -n "${AVOCADO38_PYTHON:-}" ]]; then
        echo "$AVOCADO38_PYTHON"
        return
    fi
    local c
    for c in "${PYENV_ROOT:-/root/.pyenv}/versions/3.8.18/bin/python" \
        "${PYENV_ROOT:-/root/.pyenv}"/versions/3.8.*/bin/python python3.8; do
        if command -v "$c" >/dev/null 2>&1; then
            echo "$c"
            return
        fi
    done
    echo "setup.sh: no Python 3.8 found; expected pyenv's 3.8.18 or python3.8 on PATH." \
        "Set AVOCADO38_PYTHON to a Python 3.8 interpreter (avocado 0.4.1 needs Python < 3.9)." >&2
    exit 1
}

if ! command -v g++ >/dev/null 2>&1; then
    echo "setup.sh: g++ not found; Theano compiles its ops with it. apt-get install g++" >&2
    exit 1
fi

if [[ -x "$venv/bin/python" ]] &&
    KERAS_BACKEND=theano "$venv/bin/python" -c "import avocado" >/dev/null 2>&1; then
    echo "setup.sh: $venv already has avocado; nothing to do."
    exit 0
fi

py="$(find_python)"
ver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$ver" != "3.8" ]]; then
    echo "setup.sh: $py is Python $ver; expected 3.8 (avocado 0.4.1 requires Python < 3.9)." >&2
    exit 1
fi

mkdir -p "$(dirname "$venv")"
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade "pip<25" "setuptools<76" wheel
# Pins: the versions avocado-epigenome 0.4.1's README says it was tested with, plus scipy
# (Theano needs it; 1.10.1 is the last release with Python 3.8 wheels). Keras >= 2.4 has no
# Theano backend; Theano 1.0.5 fails to import with numpy >= 1.22; h5py < 3 has no Py >= 3.9.
"$venv/bin/python" -m pip install --quiet \
    "avocado-epigenome==0.4.1" \
    "keras==2.3.1" \
    "Theano==1.0.5" \
    "numpy==1.21.6" \
    "scipy==1.10.1" \
    "h5py==2.10.0" \
    "pandas==2.0.3" \
    "pyBigWig==0.3.22"

KERAS_BACKEND=theano THEANO_FLAGS="floatX=float32,device=cpu,cxx=g++" \
    "$venv/bin/python" -c "import avocado, keras, theano; print('setup.sh: ok', \
keras.__version__, keras.backend.backend(), theano.__version__)"
echo "setup.sh: venv ready at $venv"
