"""VisualOPSDTrainer on 2 CPU processes (gloo) equals 1 process: losses, grad norms and weights after 2 SGD steps.

Both runs execute `tests/scripts/train_opsd.py` (greedy generation, same global batch), every teacher mode in one
launch; the reference runs the same code in this process. Tolerances: grad norm and weights 1e-5 relative. The loss is a divergence between two nearly
equal distributions (~1e-4) summed from fp32 per-entry terms of order log(V) ~ 5 nats, so its rounding error is
absolute (~1e-8 after one step of differently ordered gradient sums): it is compared at 1e-5 relative plus 1e-7
absolute. A wrong normalisation or teacher would be off by the size of the loss itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from distributed import launch, load_script
from safetensors.torch import load_file, save_file

RTOL = 1e-5


def _single_process(model_dir, out_dir, extra) -> dict:
    """The reference, in this process (no launcher): the same script's `run`."""
    return load_script("train_opsd").run(["--out", str(out_dir / "result.json"), "--model-dir", model_dir, *extra])


def _compare(dist: dict, single: dict) -> None:
    assert single["loss"][0] > 0
    for a, b in zip(dist["loss"], single["loss"], strict=True):
        assert a == pytest.approx(b, rel=RTOL, abs=1e-7), (dist["loss"], single["loss"])
    for a, b in zip(dist["grad_norm"], single["grad_norm"], strict=True):
        assert a == pytest.approx(b, rel=RTOL)
    w_dist, w_single = load_file(dist["weights"]), load_file(single["weights"])
    assert w_dist.keys() == w_single.keys()
    for name, ref in w_single.items():
        torch.testing.assert_close(w_dist[name], ref, rtol=RTOL, atol=RTOL * ref.abs().max().item(), msg=name)


def _with_ema_file(model_dir: str, folder: Path) -> str:
    """A copy of `model_dir` whose `ema.safetensors` differs from its `model.safetensors` in every tensor (a release
    folder's layout: the reference starts its EMA teacher from the former, its student from the latter)."""
    shutil.copytree(model_dir, folder)
    state = load_file(folder / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    save_file({k: (v + 0.05 * torch.randn(v.shape, generator=gen)).contiguous() for k, v in state.items()},
              str(folder / "ema.safetensors"))
    return str(folder)


def _check_ema_start(probe: Path, model_dir: str, decay: float = 0.5) -> None:
    """`ema_init_weights: auto`: the weights the teacher pass sees (gathered from the ZeRO-3 partitions of the
    swapped-in shadow) start as the folder's ema.safetensors exactly, the student's as its model.safetensors; after step 1 the
    teacher is decay * ema + (1 - decay) * student after step 1 (the reference's EMA update from those starts)."""
    ema, policy = load_file(f"{model_dir}/ema.safetensors"), load_file(f"{model_dir}/model.safetensors")
    teacher, student, teacher1, student1 = (load_file(probe / f"ema-{tag}.safetensors") for tag in
                                            ("start-teacher", "start-student", "step1-teacher", "step1-student"))
    assert teacher.keys() == student.keys() and set(teacher) <= set(ema) and len(teacher) >= len(ema) - 1  # tied head
    for name in teacher:
        assert not torch.equal(ema[name], policy[name]), name
        torch.testing.assert_close(teacher[name], ema[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(student[name], policy[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(teacher1[name], decay * ema[name] + (1 - decay) * student1[name], rtol=1e-6,
                                   atol=1e-8, msg=name)
        assert not torch.equal(student1[name], student[name]), name  # the step moved the policy


ALL_MODES = "ema,self,fixed"
CASES = [
    # The EMA teacher starts from the folder's ema.safetensors (ema_init_weights: auto); the other cases start it
    # from the policy.
    pytest.param("text_lm", "text", ALL_MODES, "cpu_zero3", ["--ema-init", "auto", "--probe-teacher", "1"],
                 id="text-zero3"),
    pytest.param("qwen2_5_vl", "vl", ALL_MODES, "cpu_zero3", [], id="qwen2.5vl-zero3"),
    pytest.param("text_lm", "text", ALL_MODES, "cpu_zero3", ["--global-batch", "4", "--ga", "2"],
                 marks=pytest.mark.slow, id="text-zero3-ga2"),
    pytest.param("text_lm", "text", ALL_MODES, "cpu_zero2", [], marks=pytest.mark.slow, id="text-zero2"),
    pytest.param("text_lm", "text", ALL_MODES, "cpu_ddp", [], marks=pytest.mark.slow, id="text-ddp"),
    pytest.param("text_lm", "text", "ema", "cpu_zero3", ["--fused", "0"], marks=pytest.mark.slow,
                 id="text-zero3-logits-path"),
    # Per-sample means over the samples of both ranks (num_items_in_batch counts samples), of different lengths.
    pytest.param("text_lm", "text", "ema,self", "cpu_zero3", ["--norm", "samples", "--uneven", "1"],
                 id="text-zero3-samples"),
]


@pytest.mark.distributed
@pytest.mark.parametrize("model, kind, modes, config, extra", CASES)
def test_two_processes_equal_one(model, kind, modes, config, extra, tiny_model_dirs, tmp_path):
    args = ["--kind", kind, "--mode", modes, *extra]
    model_dir = tiny_model_dirs[model]
    if "--ema-init" in extra:
        model_dir = _with_ema_file(model_dir, tmp_path / "model")
    dist = launch("train_opsd", config, ["--model-dir", model_dir, *args], tmp_path / "dist", timeout=900)
    single = _single_process(model_dir, tmp_path / "single", args)
    if "--probe-teacher" in extra:
        _check_ema_start(tmp_path / "dist", model_dir)
    assert dist["world_size"] == 2 and single["world_size"] == 1
    full = sum(t.numel() for t in load_file(single["runs"][modes.split(",")[0]]["weights"]).values())
    for mode in modes.split(","):
        _compare(dist["runs"][mode], single["runs"][mode])
        if mode in ("ema", "fixed") and config == "cpu_zero3":
            # The shadow teacher is sharded like the model: this rank holds about half of the trainable weights.
            assert dist["runs"][mode]["shadow_numel"] < 0.6 * full


@pytest.mark.distributed
@pytest.mark.parametrize(
    "model, kind, modes",
    [pytest.param("text_lm", "text", ALL_MODES, id="text"), pytest.param("qwen2_5_vl", "vl", "ema", id="qwen2.5vl")],
)
def test_zero3_ranks_with_different_completion_lengths(model, kind, modes, tiny_model_dirs, tmp_path):
    """ZeRO-3, one sample per rank, completions of different lengths on the two ranks (as sampling gives): every
    rank must run as many forward passes in generation (a ZeRO-3 forward is a collective, gathered weights or not),
    else the rank with the longer completion waits forever. Finishes, and equals 1 process."""
    args = ["--kind", kind, "--mode", modes, "--uneven", "1"]
    # A hang is a failure: 2 steps take well under a minute.
    dist = launch("train_opsd", "cpu_zero3", ["--model-dir", tiny_model_dirs[model], *args], tmp_path / "dist",
                  timeout=300)
    single = _single_process(tiny_model_dirs[model], tmp_path / "single", args)
    for mode in modes.split(","):
        run = dist["runs"][mode]
        # Global batch 2, one sample per rank: the shortest and the longest completion are on different ranks.
        assert all(lo < hi for lo, hi in zip(run["min_length"], run["max_length"], strict=True)), run
        # The generator was built before train() (the script sets its sampling), yet generates on the engine, from
        # which TRL's unwrap takes the ZeRO-3 hooks off while the weights are gathered.
        assert run["generator_model"] == "DeepSpeedEngine"
        _compare(run, single["runs"][mode])


@pytest.mark.parametrize("mode", ["ema", "self"])
def test_gradient_accumulation_2x1_equals_batch_2(mode, tiny_model_dirs, tmp_path):
    """Loss normalised by the completion tokens of the whole accumulation window (TRL's num_items_in_batch)."""
    base = ["--kind", "text", "--mode", mode, "--global-batch", "2"]
    ga = _single_process(tiny_model_dirs["text_lm"], tmp_path / "ga", [*base, "--ga", "2"])["runs"][mode]
    batch = _single_process(tiny_model_dirs["text_lm"], tmp_path / "batch", [*base, "--ga", "1"])["runs"][mode]
    _compare(ga, batch)


def test_gradient_accumulation_2x1_equals_batch_2_per_sample_mean(tiny_model_dirs, tmp_path):
    """loss_normalization="samples": each sample's mean, over the samples of the whole accumulation window. The
    completions have different lengths, so the two normalizations give different losses."""
    base = ["--kind", "text", "--mode", "self", "--global-batch", "4", "--uneven", "1"]
    model = tiny_model_dirs["text_lm"]
    ga = _single_process(model, tmp_path / "ga", [*base, "--ga", "2", "--norm", "samples"])["runs"]["self"]
    batch = _single_process(model, tmp_path / "batch", [*base, "--ga", "1", "--norm", "samples"])["runs"]["self"]
    _compare(ga, batch)
    assert any(lo < mean for lo, mean in zip(batch["min_length"], batch["mean_length"], strict=True))
    tokens = _single_process(model, tmp_path / "tokens", [*base, "--ga", "1"])["runs"]["self"]
    assert abs(tokens["loss"][0] - batch["loss"][0]) > 1e-3 * batch["loss"][0], (tokens["loss"], batch["loss"])
