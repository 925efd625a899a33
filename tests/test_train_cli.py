"""`opsd-trl train` / `python -m opsd_trl.train`: TrlParser parsing and overrides, the start-up checks (each
error names the fix), and the CPU recipe end to end: in process with tensorboard, and under `accelerate launch`
with 2 ZeRO-3 processes."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from distributed import _free_port, launch_env
from recipe_utils import EIGHT_GPUS, GIB, MODEL_CONFIGS, REPO, parse_recipe, write_manifest

from opsd_trl.cli import main as cli_main
from opsd_trl.startup_checks import Launch, StartupError, validate
from opsd_trl.train import parse_args
from opsd_trl.vt_cache import config_fingerprint

CPU_RECIPE = REPO / "recipes/cpu_quickstart.yaml"
QWEN25 = REPO / "recipes/qwen2_5_vl_7b_thinkmorph_frozen_vit.yaml"  # the recipe with a VT cache
SHORT = ["--init_weights", "none", "--max_steps", "2", "--task_n_train", "16", "--per_device_train_batch_size", "4"]


def test_unknown_recipe_key_is_refused(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(CPU_RECIPE.read_text() + "\nbeta_typo: 0.3\n")
    with pytest.raises(ValueError, match="beta_typo"):
        parse_args(["--config", str(recipe)])


def test_command_line_overrides_recipe():
    s, t, m = parse_args(["--config", str(CPU_RECIPE), "--beta", "0.25", "--task_kwargs", '{"size": 4}',
                          "--init_weights", "none"])
    assert t.beta == 0.25 and s.task_kwargs == {"size": 4} and s.init_weights is None
    assert t.teacher_mode == "fixed" and m.model_name_or_path == "tiny:quickstart"  # the rest from the recipe
    assert s.recipe == str(CPU_RECIPE)


def _qwen25(tmp_path, *overrides):
    s, t, m = parse_recipe(QWEN25, *overrides)
    config = MODEL_CONFIGS[m.model_name_or_path]()
    t.vt_cache_dir = write_manifest(tmp_path / "cache", **config_fingerprint(config))
    return s, t, m, config


def test_vllm_without_package_or_gpu(tmp_path):
    s, t, m, config = _qwen25(tmp_path)
    with pytest.raises(StartupError, match="pip install|use_vllm: false"):
        validate(s, t, m, launch=replace(EIGHT_GPUS, vllm_installed=False), model_config=config)
    with pytest.raises(StartupError, match="needs a GPU.*use_vllm: false"):
        validate(s, t, m, launch=replace(EIGHT_GPUS, gpus=0), model_config=config)


def test_vllm_is_refused_for_a_family_it_does_not_serve_on_policy():
    # vLLM 0.31 serves BAGEL without qk-norm and with other image positions/attention: off-policy samples.
    s, t, m = parse_recipe(REPO / "recipes/thinkmorph_7b.yaml", "--use_vllm", "true")
    config = MODEL_CONFIGS[m.model_name_or_path]()
    with pytest.raises(StartupError, match="use_vllm=true.*'bagel'.*use_vllm: false"):
        validate(s, t, m, launch=EIGHT_GPUS, model_config=config)
    t.use_vllm = False
    validate(s, t, m, launch=EIGHT_GPUS, model_config=config)
    s, t, m, config = _qwen25_config(REPO / "recipes/qwen2_5_vl_7b_thinkmorph.yaml")
    assert t.use_vllm  # a family vLLM serves as the loss sees it passes
    validate(s, t, m, launch=EIGHT_GPUS, model_config=config)


def _qwen25_config(recipe):
    s, t, m = parse_recipe(recipe)
    return s, t, m, MODEL_CONFIGS[m.model_name_or_path]()


def test_fixed_teacher_copy_too_large_without_peft(tmp_path):
    s, t, m, config = _qwen25(tmp_path, "--teacher_mode", "fixed")
    one_gpu = Launch(world_size=1, gpus=1, device_memory=80 * GIB, zero_stage=None, vllm_installed=True)
    with pytest.raises(StartupError, match="use_peft: true"):
        validate(s, t, m, launch=one_gpu, model_config=config)
    validate(s, t, m, launch=EIGHT_GPUS, model_config=config)  # ZeRO-3 over 8 shards it: ~5 GiB each
    validate(s, t, replace(m, use_peft=True), launch=one_gpu, model_config=config)  # the LoRA base: no copy


def test_zero3_on_cpu_needs_gloo():
    s, t, m = parse_args(["--config", str(CPU_RECIPE), "--init_weights", "none"])
    cpu2 = Launch(world_size=2, gpus=0, device_memory=24 * GIB, zero_stage=3, vllm_installed=False)
    with pytest.raises(StartupError, match="--ddp_backend gloo"):
        validate(s, t, m, launch=cpu2)
    t.ddp_backend = "gloo"  # set after parsing: a single test process cannot start a gloo group
    validate(s, t, m, launch=cpu2)


def test_vt_cache_must_match_the_model(tmp_path):
    s, t, m, config = _qwen25(tmp_path)
    t.vt_cache_dir = write_manifest(tmp_path / "other", **{**config_fingerprint(config), "hidden_size": 4096})
    with pytest.raises(StartupError, match="hidden_size.*Rebuild it"):
        validate(s, t, m, launch=EIGHT_GPUS, model_config=config)
    t.vt_cache_dir = str(tmp_path / "absent")
    with pytest.raises(StartupError, match="build-vt-cache"):
        validate(s, t, m, launch=EIGHT_GPUS, model_config=config)


def test_startup_error_exits_before_loading(tmp_path, capsys):
    rc = cli_main(["train", "--config", str(CPU_RECIPE), *SHORT, "--use_vllm", "true", "--output_dir",
                   str(tmp_path / "out")])
    assert rc == 2 and "use_vllm" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cpu_recipe_in_process_with_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert cli_main(["train", "--config", str(CPU_RECIPE), *SHORT, "--logging_steps", "1", "--output_dir",
                     str(out), "--report_to", "tensorboard"]) == 0
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"train/loss", "train/kl_teacher_student"} <= set(events.Tags()["scalars"])
    card = (out / "README.md").read_text()
    assert "## Visual-OPSD" in card and "cpu_quickstart.yaml" in card and "kl_teacher_student" in card
    assert "train_loss" in json.loads((out / "train_results.json").read_text())
    saved = json.loads((out / "teacher_context.json").read_text())  # read back by `opsd-trl eval`
    assert saved["teacher_intro"] == " hint" and saved["teacher_transition"] == "answer"


def test_context_words_the_tokenizer_cannot_write_are_refused(tmp_path):
    """The teacher context of the quickstart model's 64-word vocabulary turned unknown words into <unk> silently."""
    with pytest.raises(ValueError, match="teacher_transition 'Now answer.' cannot be written with this tokenizer's "
                                         "vocabulary: it reads back as '<unk> <unk>'"):
        cli_main(["train", "--config", str(CPU_RECIPE), *SHORT, "--teacher_transition", "Now answer.",
                  "--output_dir", str(tmp_path / "out")])


# ----------------------------------------------------------------------------------------------- ZeRO-3 == 1 process
# A 2-process ZeRO-3 run of `opsd-trl train` logs the losses of a 1-process run of the same command (no launcher, no
# DeepSpeed) over the same global batch: same data order, same seed, and `top_k 1` so that sampling picks the argmax
# whatever each process's random stream (the loss temperature stays the recipe's). Compared: the last step's loss,
# the mean loss over the steps (`train_loss`) and the last gradient norm, from `train_results.json`. Tolerance: the
# ZeRO-3 run sums the same fp32 terms and gradients in another order (two ranks, then a reduce), a rounding
# difference that AdamW's first, sign-like update carries into step 2: measured 1e-7 relative on the Qwen2.5-VL
# folder (loss, mean loss and grad norm); 1e-5 relative (+1e-7 absolute for near-zero losses), as the trainer's own
# 2-process tests. Half the global batch moved them by 14-22%, sampling at temperature 1 without top_k by 1-22%.
SAME_AS_ONE = ["--top_k", "1", "--logging_steps", "1"]
ZERO3_RTOL, ZERO3_ATOL = 1e-5, 1e-7


def launch_train(argv: list[str], out, timeout: int = 600) -> subprocess.CompletedProcess:
    config = REPO / "accelerate_configs/cpu_zero3.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
           "--main_process_port", str(_free_port()), "-m", "opsd_trl.train", *argv, "--ddp_backend", "gloo",
           "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(config), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_zero3_equals_one_process(argv: list[str], zero3_out, tmp_path, per_device: int) -> None:
    """`argv` trained in this process with the 2 processes' global batch (`per_device` x 2) logs the same losses."""
    single_out = tmp_path / "single"
    assert cli_main(["train", *argv, "--per_device_train_batch_size", str(2 * per_device), "--output_dir",
                     str(single_out)]) == 0
    zero3, single = (json.loads((d / "train_results.json").read_text()) for d in (zero3_out, single_out))
    assert zero3["step"] == single["step"] == 2
    assert single["loss"] > 0
    for key in ("loss", "train_loss", "grad_norm"):
        assert zero3[key] == pytest.approx(single[key], rel=ZERO3_RTOL, abs=ZERO3_ATOL), (key, zero3, single)


@pytest.mark.slow
@pytest.mark.distributed
def test_cpu_recipe_two_processes_zero3(tmp_path):
    argv = ["--config", str(CPU_RECIPE), *SHORT, *SAME_AS_ONE, "--report_to", "none"]
    launch_train(argv, tmp_path / "run")
    from opsd_trl.models.loading import load_pretrained

    model, _ = load_pretrained(tmp_path / "run")  # full weights gathered from the 2 ZeRO-3 shards
    assert sum(p.numel() for p in model.parameters()) > 600_000
    assert_zero3_equals_one_process(argv, tmp_path / "run", tmp_path, per_device=4)


# ----------------------------------------------------------------------------------------------- saved model folders
# Every supported family saved in its real layout (save_pretrained of the model and of its processor / tokenizer:
# config.json, model.safetensors, tokenizer files, processor config) and trained through `opsd-trl train`: the
# loader is the one a GPU user runs, nothing in between is replaced.
TEXT_RECIPE = REPO / "recipes/text_lm.yaml"
VL_FOLDER_ARGS = ["--config", str(CPU_RECIPE), "--init_weights", "none", "--max_steps", "1", "--task_n_train", "4",
                  "--per_device_train_batch_size", "2", "--teacher_top_k", "16", "--report_to", "none", "--warmup_steps", "0",
                  "--learning_rate", "1e-2"]


def text_jsonl(path, n=4):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"t{i}", "prompt": [{"role": "user", "content": f"Solve {i}+1."}], "images": [],
                                "vt_images": [], "vt_text": f"think {i}", "answer": str(i + 1)}) + "\n")
    return str(path)


def text_folder_args(model_dir, data):
    return ["--config", str(TEXT_RECIPE), "--model_name_or_path", model_dir, "--dataset_name", data,
            "--use_peft", "false", "--teacher_mode", "ema", "--use_vllm", "false", "--dtype", "float32", "--bf16",
            "false", "--gradient_checkpointing", "false", "--max_steps", "1", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--max_completion_length", "8", "--teacher_top_k", "16",
            "--report_to", "none", "--warmup_steps", "0", "--learning_rate", "1e-2"]


@pytest.mark.parametrize("family", ["text_lm", "qwen2_5_vl", "qwen3_vl", "bagel"])
def test_cli_trains_a_saved_model_folder(family, family_model_dirs, tmp_path):
    from opsd_trl.models.loading import load_pretrained

    model_dir, out = family_model_dirs[family], tmp_path / "run"
    if family == "text_lm":
        argv = text_folder_args(model_dir, text_jsonl(tmp_path / "text.jsonl"))
    else:
        argv = [*VL_FOLDER_ARGS, "--model_name_or_path", model_dir]
    assert cli_main(["train", *argv, "--output_dir", str(out)]) == 0
    assert json.loads((out / "train_results.json").read_text())["step"] == 1
    before, _ = load_pretrained(model_dir, dtype="float32")
    after, processing_class = load_pretrained(str(out), dtype="float32")  # the output is a loadable folder again
    assert type(after) is type(before)
    assert type(processing_class).__name__ == type(load_pretrained(model_dir)[1]).__name__
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed, "one optimizer step changed no weight"


@pytest.mark.slow
@pytest.mark.distributed
def test_cli_qwen2_5_vl_folder_two_processes_zero3(tiny_model_dirs, tmp_path):
    argv = [*VL_FOLDER_ARGS, "--model_name_or_path", tiny_model_dirs["qwen2_5_vl"], "--max_steps", "2",
            *SAME_AS_ONE]
    launch_train(argv, tmp_path / "run")
    from opsd_trl.models.loading import load_pretrained

    model, _ = load_pretrained(str(tmp_path / "run"), dtype="float32")  # gathered from the 2 ZeRO-3 shards
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert_zero3_equals_one_process(argv, tmp_path / "run", tmp_path, per_device=2)


def test_resume_from_checkpoint_true_on_the_command_line(tmp_path):
    out = tmp_path / "run"
    _, t, _ = parse_args(["--config", str(CPU_RECIPE), "--resume_from_checkpoint", "true"])
    assert t.resume_from_checkpoint is True  # as YAML `true`, not a folder named "true"
    assert parse_args(["--config", str(CPU_RECIPE), "--resume_from_checkpoint", "false"])[1].resume_from_checkpoint \
        is None
    base = ["train", "--config", str(CPU_RECIPE), *SHORT, "--report_to", "none", "--logging_steps", "1",
            "--output_dir", str(out)]
    with pytest.raises(ValueError, match=f"no complete checkpoint in {out}"):
        cli_main([*base, "--resume_from_checkpoint", "true"])
    assert cli_main([*base, "--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1"]) == 0
    first = json.loads((out / "checkpoint-1/trainer_state.json").read_text())["log_history"]
    assert cli_main([*base, "--resume_from_checkpoint", "last", "--save_strategy", "steps", "--save_steps", "1"]) == 0
    resumed = json.loads((out / "checkpoint-2/trainer_state.json").read_text())["log_history"]
    assert resumed[0] == first[0]  # step 1 came from the checkpoint, step 2 was trained after it
    assert json.loads((out / "train_results.json").read_text())["step"] == 2


def test_task_kwargs_and_dataset_file_errors(tmp_path):
    with pytest.raises(ValueError, match="task_kwargs must be a JSON object"):
        parse_args(["--config", str(CPU_RECIPE), "--task_kwargs", "{size: 4}"])
    with pytest.raises(ValueError, match="task_kwargs must be a JSON object"):
        parse_args(["--config", str(CPU_RECIPE), "--task_kwargs", "[4]"])
    (tmp_path / "rows.txt").write_text("x")
    s, _, _ = parse_args(["--config", str(CPU_RECIPE), "--task", "none", "--dataset_name", str(tmp_path / "rows.txt")])
    assert s.task is None  # the command line unsets the recipe's task
    with pytest.raises(ValueError, match=r"rows.txt: unknown extension \.txt"):
        cli_main(["train", "--config", str(CPU_RECIPE), *SHORT, "--task", "none", "--dataset_name",
                  str(tmp_path / "rows.txt"), "--output_dir", str(tmp_path / "run")])


def test_recipe_warmstart_with_another_model_folder_says_init_weights_none(tiny_model_dirs, tmp_path):
    # cpu_quickstart.yaml sets init_weights: warmstart (the quickstart model's weights); a folder model needs none.
    with pytest.raises(ValueError, match="does not fit model_name_or_path=.*--init_weights none"):
        cli_main(["train", "--config", str(CPU_RECIPE), "--model_name_or_path", tiny_model_dirs["qwen2_5_vl"],
                  "--max_steps", "1", "--task_n_train", "4", "--output_dir", str(tmp_path / "run")])


def test_model_folder_without_config_is_a_startup_error(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    rc = cli_main(["train", "--config", str(CPU_RECIPE), *SHORT, "--model_name_or_path", str(tmp_path / "model"),
                   "--output_dir", str(tmp_path / "run")])
    assert rc == 2 and "cannot read the config of model_name_or_path" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- ThinkMorph recipe
THINKMORPH = REPO / "recipes/thinkmorph_7b.yaml"
THINKMORPH_FROZEN = REPO / "recipes/thinkmorph_7b_frozen_vit.yaml"  # frozen tower + VT cache
TINY_BAGEL_IMAGES = '{"max_image_size": 56, "min_image_size": 28, "max_pixels": 3136}'  # the tiny 8 x 8 tower


def thinkmorph_disk_dataset(path, n=8):
    """A small dataset in ThinkMorph's own columns (problem_image, question, reasoning_image_k, answer)."""
    from datasets import Dataset
    from PIL import Image

    def image(seed, size=(56, 42)):
        g = torch.Generator().manual_seed(seed)
        return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())

    rows = [{"pid": f"tm{i}", "problem_image": image(i), "question": f"Which way, {i}?",
             "reasoning_image_1": image(100 + i), "reasoning_image_2": image(200 + i, (42, 56)), "answer": "A"}
            for i in range(n)]
    Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def test_thinkmorph_recipe_refuses_an_ambiguous_folder(bagel_release_dir, tmp_path, capsys):
    rc = cli_main(["train", "--config", str(THINKMORPH), "--model_name_or_path", bagel_release_dir, "--bagel_weights",
                   "none", "--use_cpu", "true", "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "ema.safetensors" in err and "model.safetensors" in err and "bagel_weights" in err


@pytest.mark.slow
@pytest.mark.distributed
def test_thinkmorph_recipe_cli_release_folder_zero3(bagel_release_dir, tmp_path):
    """The ThinkMorph-7B recipe (its frozen-tower variant) from the command line on a tiny BAGEL release folder:
    build-vt-cache, 2 steps on 2
    ZeRO-3 processes, then eval of the output folder."""
    data = thinkmorph_disk_dataset(tmp_path / "thinkmorph")
    cache = tmp_path / "vt_cache"
    assert cli_main(["build-vt-cache", "--model", bagel_release_dir, "--bagel-weights", "model",
                     "--image-processor-kwargs", TINY_BAGEL_IMAGES, "--dataset", data, "--format", "thinkmorph",
                     "--output", str(cache), "--dtype", "float32", "--device", "cpu", "--no-progress"]) == 0
    out = tmp_path / "run"
    argv = ["--config", str(THINKMORPH_FROZEN), "--model_name_or_path", bagel_release_dir, "--image_processor_kwargs",
            TINY_BAGEL_IMAGES, "--dataset_preset", "none", "--dataset_name", data, "--dataset_format", "thinkmorph",
            "--vt_cache_dir", str(cache), "--dtype", "float32", "--bf16", "false", "--max_steps", "2",
            "--max_completion_length", "8", "--teacher_top_k", "16", "--warmup_steps", "0", "--gradient_checkpointing",
            "false", "--save_strategy", "no", "--report_to", "none", *SAME_AS_ONE]
    proc = launch_train(argv, out, timeout=900)
    assert "loaded 72 tensors from model.safetensors" in proc.stderr  # the recipe's choice, not ema.safetensors
    assert_zero3_equals_one_process(argv, out, tmp_path, per_device=1)
    from opsd_trl.models.loading import load_pretrained

    trained, processor = load_pretrained(str(out), dtype="float32")  # gathered from the 2 ZeRO-3 shards
    start, _ = load_pretrained(bagel_release_dir, dtype="float32", bagel_weights="model")
    assert type(trained).__name__ == "BagelForConditionalGeneration"
    assert processor.image_processor.max_image_size == 56  # the recipe's transform travels with the output
    assert any(not torch.equal(v, start.state_dict()[k]) for k, v in trained.state_dict().items())
    rc = subprocess.run([sys.executable, "-m", "opsd_trl.cli", "eval", "--model", str(out), "--n", "4", "--size", "3",
                         "--batch-size", "4", "--max-new-tokens", "4"], cwd=REPO, env=launch_env(), capture_output=True,
                        text=True, timeout=600)
    assert rc.returncode == 0, rc.stdout[-3000:] + rc.stderr[-3000:]
    assert "accuracy" in rc.stdout


def test_recipe_file_errors_name_the_file_and_the_key(tmp_path):
    """A key written twice silently took the last value; a missing recipe gave a bare FileNotFoundError."""
    with pytest.raises(FileNotFoundError, match=f"recipe {tmp_path / 'absent.yaml'} not found \\(--config\\)"):
        cli_main(["train", "--config", str(tmp_path / "absent.yaml")])
    recipe = tmp_path / "twice.yaml"
    lines = CPU_RECIPE.read_text().splitlines()
    recipe.write_text("\n".join([*lines, "beta: 0.3"]) + "\n")
    first = next(i for i, line in enumerate(lines, 1) if line.startswith("beta:"))
    with pytest.raises(ValueError, match=f"recipe {recipe}: key 'beta' is written twice \\(lines {first} and "
                                         f"{len(lines) + 1}\\); YAML would keep only the last value"):
        cli_main(["train", "--config", str(recipe), "--output_dir", str(tmp_path / "out")])


def test_thinkmorph_format_on_another_layout_names_the_columns(tmp_path):
    """`--dataset_format thinkmorph` on a standard-layout folder ended in `KeyError: 'question'`."""
    from opsd_trl.tasks import make_dataset

    make_dataset("maze", "train", 2).save_to_disk(str(tmp_path / "maze"))
    with pytest.raises(ValueError, match=r"dataset_format 'thinkmorph' needs the columns \['question', 'answer'\] "
                                         r".* lacks \['question'\] and has \['id', 'prompt', .*Formats: 'thinkmorph'"):
        cli_main(["train", "--config", str(CPU_RECIPE), *SHORT, "--task", "none", "--dataset_name",
                  str(tmp_path / "maze"), "--dataset_format", "thinkmorph", "--output_dir", str(tmp_path / "out")])


def test_evaluation_during_training_scores_the_held_out_split(tmp_path):
    """`--eval_strategy steps` ended in transformers' `you didn't pass an eval_dataset` (opsd-trl train passed none);
    now it evaluates on `dataset_test_split`, refused by name where the data lacks it."""
    from opsd_trl.tasks import make_dataset

    make_dataset("maze", "train", 4, size=3, prompt="short", answer_format="numbered").save_to_disk(
        str(tmp_path / "single"))
    evaluating = ["--eval_strategy", "steps", "--eval_steps", "2", "--eval_n", "4", "--per_device_eval_batch_size", "4"]
    with pytest.raises(ValueError, match=f"dataset {tmp_path / 'single'} holds a single dataset \\(split 'train'\\), "
                                         "not the split 'test'"):
        cli_main(["train", "--config", str(CPU_RECIPE), *SHORT, *evaluating, "--task", "none", "--dataset_name",
                  str(tmp_path / "single"), "--output_dir", str(tmp_path / "bad")])
    out = tmp_path / "run"
    assert cli_main(["train", "--config", str(CPU_RECIPE), *SHORT, *evaluating, "--report_to", "none",
                     "--output_dir", str(out)]) == 0
    assert "eval_kl_teacher_student" in json.loads((out / "train_results.json").read_text())
