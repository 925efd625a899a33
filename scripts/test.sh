#!/usr/bin/env bash
# The README's test command: set up .venv, run the default test suite (slow and 2-process tests included),
# then the real-vLLM job in its own venv (scripts/test_vllm.sh). Any failure fails the whole command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# pytest exits 5 when it collected nothing: that is a failure here too.
.venv/bin/python -m pytest "$@"
if [ "${OPSD_SKIP_VLLM:-0}" != "1" ]; then
    bash scripts/test_vllm.sh
fi
