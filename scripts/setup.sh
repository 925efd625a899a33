#!/usr/bin/env bash
# Make (or reuse) .venv with the pinned CPU stack and this package (editable, with the dev extra).
# torch==2.13.0 is pinned so pip takes the local CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip check
