"""VisualOPSDTrainer on 2 CPU processes (gloo) equals 1 process: losses, grad norms and weights after 2 SGD steps.

Both runs execute `tests/scripts/train_opsd.py` (greedy generation, same global batch); the reference runs as a
plain single process. Tolerances: grad norm and weights 1e-5 relative. The loss is a divergence between two nearly
equal distributions (~1e-4) summed from fp32 per-entry terms of order log(V) ~ 5 nats, so its rounding error is
absolute (~1e-8 after one step of differently ordered gradient sums): it is compared at 1e-5 relative plus 1e-7
absolute. A wrong normalisation or teacher would be off by the size of the loss itself.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from distributed import SCRIPTS, launch, launch_env
from safetensors.torch import load_file

RTOL = 1e-5


def _single_process(model_dir, tmp_path, extra) -> dict:
    out = tmp_path / "single" / "result.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(SCRIPTS / "train_opsd.py"), "--out", str(out), "--model-dir", model_dir, *extra]
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def _compare(dist: dict, single: dict) -> None:
    assert dist["world_size"] == 2 and single["world_size"] == 1
    assert single["loss"][0] > 0
    for a, b in zip(dist["loss"], single["loss"], strict=True):
        assert a == pytest.approx(b, rel=RTOL, abs=1e-7), (dist["loss"], single["loss"])
    for a, b in zip(dist["grad_norm"], single["grad_norm"], strict=True):
        assert a == pytest.approx(b, rel=RTOL)
    w_dist, w_single = load_file(dist["weights"]), load_file(single["weights"])
    assert w_dist.keys() == w_single.keys()
    for name, ref in w_single.items():
        torch.testing.assert_close(w_dist[name], ref, rtol=RTOL, atol=RTOL * ref.abs().max().item(), msg=name)


CASES = [
    ("text_lm", "text", "ema", "cpu_zero3", []),
    ("text_lm", "text", "self", "cpu_zero3", []),
    ("text_lm", "text", "fixed", "cpu_zero3", []),
    ("qwen2_5_vl", "vl", "ema", "cpu_zero3", []),
    pytest.param("text_lm", "text", "ema", "cpu_zero3", ["--global-batch", "4", "--ga", "2"], marks=pytest.mark.slow,
                 id="text-ema-zero3-ga2"),
    pytest.param("text_lm", "text", "ema", "cpu_zero2", [], marks=pytest.mark.slow, id="text-ema-zero2"),
    pytest.param("text_lm", "text", "ema", "cpu_ddp", [], marks=pytest.mark.slow, id="text-ema-ddp"),
    pytest.param("text_lm", "text", "ema", "cpu_zero3", ["--fused", "0"], marks=pytest.mark.slow,
                 id="text-ema-zero3-logits"),
]


@pytest.mark.distributed
@pytest.mark.parametrize("model, kind, mode, config, extra", CASES)
def test_two_processes_equal_one(model, kind, mode, config, extra, tiny_model_dirs, tmp_path):
    args = ["--model-dir", tiny_model_dirs[model], "--kind", kind, "--mode", mode, *extra]
    dist = launch("train_opsd", config, args, tmp_path / "dist", timeout=900)
    single = _single_process(tiny_model_dirs[model], tmp_path, args[2:])
    _compare(dist, single)
    if mode in ("ema", "fixed") and config == "cpu_zero3":
        # The shadow teacher is sharded like the model: this rank holds half of the trainable weights.
        full = sum(t.numel() for t in load_file(single["weights"]).values())
        assert dist["shadow_numel"] < 0.6 * full


@pytest.mark.parametrize("mode", ["ema", "self"])
def test_gradient_accumulation_2x1_equals_batch_2(mode, tiny_model_dirs, tmp_path):
    """Loss normalised by the completion tokens of the whole accumulation window (TRL's num_items_in_batch)."""
    base = ["--kind", "text", "--mode", mode, "--global-batch", "2"]
    ga = _single_process(tiny_model_dirs["text_lm"], tmp_path / "ga", [*base, "--ga", "2"])
    batch = _single_process(tiny_model_dirs["text_lm"], tmp_path / "batch", [*base, "--ga", "1"])
    for a, b in zip(ga["loss"], batch["loss"], strict=True):
        assert a == pytest.approx(b, rel=RTOL, abs=1e-7)
    for a, b in zip(ga["grad_norm"], batch["grad_norm"], strict=True):
        assert a == pytest.approx(b, rel=RTOL)
    w_ga, w_batch = load_file(ga["weights"]), load_file(batch["weights"])
    for name, ref in w_batch.items():
        torch.testing.assert_close(w_ga[name], ref, rtol=RTOL, atol=RTOL * ref.abs().max().item(), msg=name)
