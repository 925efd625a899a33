"""Exact resume and atomic checkpoints, through the public trainer (tests/scripts/train_opsd.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed import SCRIPTS, launch, launch_env, load_script
from safetensors.torch import load_file

from opsd_trl.checkpoints import INCOMPLETE_MARKER, last_complete_checkpoint


def _run(out, model_dir, *extra, check=True):
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(SCRIPTS / "train_opsd.py"), "--out", str(out), "--model-dir", model_dir, *extra]
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["loss"] == b["loss"]  # bit-identical: same data order, RNG, optimizer, scheduler and teacher shadow
    assert a["grad_norm"] == b["grad_norm"]
    wa, wb = load_file(a["weights"]), load_file(b["weights"])
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert (a.get("shadow") is None) == (b.get("shadow") is None)
    if a.get("shadow"):  # the EMA / fixed teacher weights (this rank's pieces) too
        for rank_file_a in sorted(Path(a["shadow"]).parent.glob(Path(a["shadow"]).name.replace("rank0", "rank*"))):
            sa = load_file(str(rank_file_a))
            sb = load_file(str(Path(b["shadow"]).parent / rank_file_a.name))
            assert sa.keys() == sb.keys() and sa
            for name in sa:
                assert torch.equal(sa[name], sb[name]), f"shadow {name}"


KIND = {"text_lm": "text", "qwen2_5_vl": "vl", "qwen3_vl": "vl", "bagel": "vl"}


@pytest.mark.parametrize("family", list(KIND))
@pytest.mark.parametrize("mode", ["self", "ema", "fixed"])
def test_resume_is_exact_for_every_family(family, mode, family_model_dirs, tmp_path):
    """Straight 4 steps vs. 2 + resume from checkpoint-2: the same losses, grad norms, weights and teacher shadow.
    (Qwen2.5-VL checkpoints store renamed keys: a resume that matched module names loaded 1 of 57 tensors.)"""
    run = load_script("train_opsd").run
    common = ["--model-dir", family_model_dirs[family], "--kind", KIND[family], "--mode", mode, "--steps", "4",
              "--save-steps", "2", "--sample", "1"]
    a = run(["--out", str(tmp_path / "straight" / "r.json"), *common])["runs"][mode]
    b = run(["--out", str(tmp_path / "resumed" / "r.json"), *common, "--resume",
             str(tmp_path / "straight" / "run" / "checkpoint-2")])["runs"][mode]
    assert len(a["loss"]) == 4 and (a["shadow"] is None) == (mode == "self")
    _assert_same_run(a, b)


def test_resume_with_incomplete_weights_names_the_missing_keys(tiny_model_dirs, tmp_path):
    from safetensors.torch import save_file

    run = load_script("train_opsd").run
    common = ["--model-dir", tiny_model_dirs["qwen2_5_vl"], "--kind", "vl", "--steps", "2", "--save-steps", "1"]
    run(["--out", str(tmp_path / "a" / "r.json"), *common])
    checkpoint = tmp_path / "a" / "run" / "checkpoint-1"
    weights = load_file(str(checkpoint / "model.safetensors"))
    dropped = sorted(k for k in weights if "blocks.0.attn.qkv" in k)
    save_file({k: v for k, v in weights.items() if k not in dropped}, str(checkpoint / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not load completely.*2 weights missing.*blocks\.0\.attn\.qkv"):
        run(["--out", str(tmp_path / "b" / "r.json"), *common, "--resume", str(checkpoint)])


@pytest.mark.parametrize("mode", ["ema", "fixed"])
def test_resume_is_exact_single_process(mode, tiny_model_dirs, tmp_path):
    run = load_script("train_opsd").run
    common = ["--model-dir", tiny_model_dirs["text_lm"], "--mode", mode, "--steps", "4", "--save-steps", "2",
              "--sample", "1"]
    a = run(["--out", str(tmp_path / "straight" / "r.json"), *common])["runs"][mode]
    checkpoint = tmp_path / "straight" / "run" / "checkpoint-2"
    b = run(["--out", str(tmp_path / "resumed" / "r.json"), *common, "--resume", str(checkpoint)])["runs"][mode]
    assert len(a["loss"]) == 4
    _assert_same_run(a, b)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("family", list(KIND))
def test_resume_is_exact_under_zero3(family, family_model_dirs, tmp_path):
    """2 processes, ZeRO-3, sampled completions: resumed from a checkpoint, the run equals the uninterrupted one.
    The text model resumes in new processes and in a later epoch: gradient accumulation 2, 2 steps per epoch (8 rows,
    global batch 4), from checkpoint-3 (the middle of epoch 1, whose sample order the sampler draws afresh). The
    other families resume from checkpoint-2 (epoch 0) in the processes of the uninterrupted run, after it (a new
    trainer and DeepSpeed engine: one launch instead of two)."""
    later = family == "text_lm"
    save = 3 if later else 2
    common = ["--model-dir", family_model_dirs[family], "--kind", KIND[family], "--mode", "ema", "--steps", "4",
              "--save-steps", str(save), "--sample", "1", *(["--global-batch", "4", "--ga", "2"] if later else [])]
    checkpoint = tmp_path / "straight" / "run" / f"checkpoint-{save}"
    if later:
        a = launch("train_opsd", "cpu_zero3", common, tmp_path / "straight", timeout=900)["runs"]["ema"]
        b = launch("train_opsd", "cpu_zero3", [*common, "--resume", str(checkpoint)], tmp_path / "resumed",
                   timeout=900)["runs"]["ema"]
    else:
        a = launch("train_opsd", "cpu_zero3", [*common, "--then-resume-from", str(save)], tmp_path / "straight",
                   timeout=900)["runs"]["ema"]
        b = a.pop("resumed")
    assert {p.name for p in checkpoint.glob("teacher_shadow_rank*.safetensors")} == {
        "teacher_shadow_rank0.safetensors", "teacher_shadow_rank1.safetensors"}
    assert len(a["loss"]) == 4
    _assert_same_run(a, b)


def test_killed_save_leaves_the_previous_checkpoint_and_resume_skips_it(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["text_lm"]
    common = ["--mode", "ema", "--steps", "4", "--save-steps", "1"]
    out = tmp_path / "run1" / "r.json"
    proc = _run(out, model_dir, *common, "--kill-during-save-at", "2", check=False)
    assert proc.returncode == -9  # SIGKILL while checkpoint-2 was being written
    run = tmp_path / "run1" / "run"
    assert (run / "checkpoint-2" / INCOMPLETE_MARKER).exists()
    assert last_complete_checkpoint(str(run)) == str(run / "checkpoint-1")
    # The previous checkpoint is intact and loadable.
    assert load_file(str(run / "checkpoint-1" / "model.safetensors"))
    assert load_file(str(run / "checkpoint-1" / "teacher_shadow_rank0.safetensors"))
    # Resuming "from the last checkpoint" picks checkpoint-1 and finishes the run.
    _run(out, model_dir, *common, "--resume", "last")
    resumed = json.loads(out.read_text())["runs"]["ema"]
    assert len(resumed["loss"]) == 4
    straight = load_script("train_opsd").run(["--out", str(tmp_path / "straight" / "r.json"), "--model-dir",
                                              model_dir, *common])["runs"]["ema"]
    _assert_same_run(straight, resumed)


def test_resume_in_a_later_epoch_after_a_kill_is_exact(tiny_model_dirs, tmp_path):
    """10 steps of 4 per epoch (8 rows, gradient accumulation 2, sampled completions), saved every 2: killed once
    checkpoint-6 (the middle of epoch 1) is complete and resumed in the same output_dir ("last"), and resumed from
    checkpoint-4 (an epoch boundary) in another: both equal the uninterrupted run, samples drawn included.
    (TRL's sampler drew every epoch's order from one generator, which a resumed run restarted.)"""
    model_dir = tiny_model_dirs["text_lm"]
    common = ["--mode", "ema", "--steps", "10", "--save-steps", "2", "--ga", "2", "--sample", "1"]
    straight = load_script("train_opsd").run(["--out", str(tmp_path / "straight" / "r.json"), "--model-dir",
                                              model_dir, *common])["runs"]["ema"]
    out = tmp_path / "killed" / "r.json"
    assert _run(out, model_dir, *common, "--kill-after-save-at", "6", check=False).returncode == -9
    # Resumed in this process: the killed run's lock does not block it.
    killed = load_script("train_opsd").run(["--out", str(out), "--model-dir", model_dir, *common, "--resume",
                                            "last"])["runs"]["ema"]
    assert len(straight["loss"]) == 10
    _assert_same_run(straight, killed)  # the log history of steps 1-6 comes from the checkpoint
    from_boundary = load_script("train_opsd").run(
        ["--out", str(tmp_path / "boundary" / "r.json"), "--model-dir", model_dir, *common, "--resume",
         str(tmp_path / "straight" / "run" / "checkpoint-4")])["runs"]["ema"]
    _assert_same_run(straight, from_boundary)


def test_load_best_model_at_end_restores_the_best_qwen2_5_vl_checkpoint(tmp_path):
    """`load_best_model_at_end` reads model.safetensors like resume does: through the model's key mapping."""
    from trainer_utils import make_config, vl_dataset

    from opsd_trl import VisualOPSDTrainer
    from opsd_trl.models.loading import to_module_keys
    from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl

    model, processor = build_tiny_qwen2_5_vl()
    config = make_config(tmp_path, max_steps=3, save_strategy="steps", save_steps=1, eval_strategy="steps",
                         eval_steps=1, load_best_model_at_end=True, metric_for_best_model="loss",
                         greater_is_better=False, learning_rate=0.1, optim="sgd", per_device_eval_batch_size=2)
    trainer = VisualOPSDTrainer(model=model, args=config, train_dataset=vl_dataset(n=4), eval_dataset=vl_dataset(n=2),
                                processing_class=processor)
    trainer.train()
    best = load_file(str(Path(trainer.state.best_model_checkpoint) / "model.safetensors"))
    best = to_module_keys(model, best)
    for name, value in model.state_dict().items():
        if name in best:
            assert torch.equal(value, best[name]), name


def test_resume_is_exact_with_lora_fixed_teacher_qwen2_5_vl(tmp_path):
    """The fixed teacher with PEFT is the LoRA base: the checkpoint holds the adapter, which PEFT reloads."""
    from peft import LoraConfig
    from trainer_utils import make_config, vl_dataset

    from opsd_trl import VisualOPSDTrainer
    from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl

    def run(name, resume=None):
        model, processor = build_tiny_qwen2_5_vl()
        model.model.visual.requires_grad_(False)
        config = make_config(tmp_path, output_dir=str(tmp_path / name), max_steps=4, save_strategy="steps",
                             save_steps=2, teacher_mode="fixed", learning_rate=0.1, optim="sgd",
                             lr_scheduler_type="constant")
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], exclude_modules=r".*\.visual\..*")
        trainer = VisualOPSDTrainer(model=model, args=config, train_dataset=vl_dataset(n=8), processing_class=processor,
                                    peft_config=lora)
        trainer.train(resume_from_checkpoint=resume)
        history = [h for h in trainer.state.log_history if "loss" in h]
        return [h["loss"] for h in history], [h["grad_norm"] for h in history], trainer.model.state_dict()

    straight = run("a")
    resumed = run("b", str(tmp_path / "a" / "checkpoint-2"))
    assert straight[:2] == resumed[:2] and len(straight[0]) == 4
    for name, value in straight[2].items():
        assert torch.equal(value, resumed[2][name]), name
