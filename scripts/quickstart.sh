#!/usr/bin/env bash
# The README's main-job command: set up .venv, then run the embedded default (procedural mazes, a small
# Qwen2.5-VL built in code, no downloads) end to end. Arguments go to `opsd-trl quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/opsd-trl quickstart "$@"
