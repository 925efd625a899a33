#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py): on a GPU, the paper's models at 7B width with reduced depth, in
# under 10 minutes; on CPU the same parts at tiny size (vLLM skipped when it does not import). One report:
# gpu_check_out/report.md (how to read it: docs/generation.md, "The GPU check"). Extra arguments go to the script,
# e.g. --size tiny, --layers 4, --out DIR, --parts loss bagel_teacher.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
exec "$PY" scripts/gpu_check.py "$@"
