#!/usr/bin/env bash
# The README's test command: make (or reuse) .venv with the pinned stack, then run the default test suite.
# torch==2.13.0 is pinned so pip takes the local CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip check
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# pytest exits 5 when it collected nothing: that is a failure here too, so no special-casing.
exec .venv/bin/python -m pytest "$@"
