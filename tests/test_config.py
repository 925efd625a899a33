"""`VisualOPSDConfig`: every field is checked (a bad value raises naming the field), the choice fields show their
choices in `opsd-trl train --help` and refuse others on the command line, options another setting makes
ineffective draw one warning naming them, and the teacher-copy rule."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings

import pytest
from recipe_utils import REPO

from opsd_trl import VisualOPSDConfig
from opsd_trl.cli import main as cli_main


def _config(tmp_path, **overrides) -> VisualOPSDConfig:
    return VisualOPSDConfig(output_dir=str(tmp_path), bf16=False, report_to=[], **overrides)


# One bad value per field VisualOPSDConfig declares, and the words the error must contain besides the field name.
BAD_VALUES = {
    "beta": (1.5, "[0.0, 1.0]"),
    "loss_type": ("kl", "('gjsd', 'sampled_reverse_kl')"),
    "teacher_top_k": (0, ">= 1 or None"),
    "jsd_clip": (0.0, "> 0 or None"),
    "jsd_clip_form": ("positive", "('reference', 'nonnegative')"),
    "loss_normalization": ("sequence", "('tokens', 'samples')"),
    "close_truncated_completions": ("yes", "a bool"),
    "fused_loss": (1, "a bool"),
    "loss_chunk_size": (0, ">= 1"),
    "num_loss_tokens_to_skip": (-1, ">= 0"),
    "teacher_mode": ("frozen", "('self', 'ema', 'fixed')"),
    "ema_decay": (1.5, "[0, 1]"),
    "max_vt_images": (0, ">= 1"),
    "teacher_intro": (None, "a string"),
    "teacher_transition": (3, "a string"),
    "teacher_prompt_template": ("{prompt} only", "both {prompt} and {privileged_context} placeholders"),
    "vt_source": ("disk", "('cache', 'online')"),
    "vt_cache_dir": (7, "a folder or None"),
    "allow_trainable_vision_with_cache": ("false", "a bool"),
    "on_missing_vt": ("skip", "('error', 'no_vt_teacher')"),
    "reuse_problem_image_features": ("yes", "a bool"),
    "noise_vt": (None, "a bool"),
    "noise_vt_space": ("tokens", "('pixels', 'embeddings')"),
    "noise_vt_count": (0, ">= 1 or None"),
    "image_skip_marker": (5, "a string or None"),
    "image_skip_token": ("", "a non-empty string"),
    "max_image_skips": (-1, ">= 0"),
    "vllm_llm_kwargs": ("dtype=float32", "a dict"),
    "max_prompt_length": (0, ">= 1 or None"),
    "teacher_text_layout": ("turns", "('one_turn', 'blocks')"),
    "system_prompt": (5, "a string or None"),
    "ema_init_weights": ("", "a path, 'auto' or None"),
}


def test_every_field_has_a_bad_value_case():
    assert set(BAD_VALUES) == set(VisualOPSDConfig.__annotations__)


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_bad_value_raises_naming_the_field_and_what_it_must_be(name, tmp_path):
    value, expected = BAD_VALUES[name]
    with pytest.raises(ValueError, match=rf"^{name} must be .*{re.escape(expected)}.*got {re.escape(repr(value))}"):
        _config(tmp_path, **{name: value})


def _float_fields() -> list[str]:
    """Every field of the config (its own and the inherited TRL / transformers ones) typed as a float."""
    return [f.name for f in dataclasses.fields(VisualOPSDConfig) if "float" in str(f.type)]


def test_the_float_fields_are_found():
    names = _float_fields()
    assert {"beta", "jsd_clip", "ema_decay", "learning_rate", "max_grad_norm", "temperature", "top_p",
            "weight_decay", "warmup_steps", "adam_beta1", "adam_beta2", "adam_epsilon"} <= set(names), names


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=str)
@pytest.mark.parametrize("name", _float_fields())
def test_every_float_field_refuses_non_finite_values(name, value, tmp_path):
    # nan passes every `<` / `>` check (TRL's beta range, transformers' warmup) and turns `max_grad_norm` clipping
    # off; inf temperature or learning rate ends inside torch's sampler.
    with pytest.raises(ValueError, match=rf"^{name} must be .*, got {value!r}"):
        _config(tmp_path, **{name: value})


# Inherited fields out of their range (finite values): the field is named with its range.
INHERITED_BAD_VALUES = {
    "learning_rate": (-1e-4, ">= 0"), "max_grad_norm": (-1.0, ">= 0"), "top_p": (0.0, "(0, 1]"),
    "adam_beta2": (1.0, "[0, 1)"), "weight_decay": (-0.1, ">= 0"), "warmup_steps": (-1, ">= 0"),
    "min_p": (1.5, "[0, 1]"), "repetition_penalty": (0.0, "> 0"), "vllm_gpu_memory_utilization": (1.5, "(0, 1]"),
    "temperature": (0.0, "> 0"), "top_k": (-1, ">= 0"),
}


@pytest.mark.parametrize("name", list(INHERITED_BAD_VALUES))
def test_inherited_fields_out_of_range_are_refused(name, tmp_path):
    value, expected = INHERITED_BAD_VALUES[name]
    with pytest.raises(ValueError, match=rf"^{name} must be .*{re.escape(expected)}.*got {re.escape(repr(value))}"):
        _config(tmp_path, **{name: value})


def test_cli_refuses_non_finite_values_before_loading_anything(tmp_path):
    """`--temperature inf` used to reach torch's sampler (`probability tensor contains either inf, nan ...`) and
    `--beta nan` the loss; `--max_grad_norm nan` switched clipping off."""
    for flag, value in (("--temperature", "inf"), ("--learning_rate", "inf"), ("--beta", "nan"),
                        ("--max_grad_norm", "nan")):
        with pytest.raises(ValueError, match=f"^{flag[2:]} must be .*got {value}"):
            cli_main(["train", "--config", str(REPO / "recipes/cpu_quickstart.yaml"), flag, value, "--output_dir",
                      str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_integer_fields_refuse_floats_and_accept_their_bounds(tmp_path):
    with pytest.raises(ValueError, match="teacher_top_k must be an integer >= 1 or None, got 2.5"):
        _config(tmp_path, teacher_top_k=2.5)
    config = _config(tmp_path, teacher_top_k=1, max_prompt_length=1, max_image_skips=0, max_vt_images=1,
                     loss_chunk_size=1, ema_decay=1, jsd_clip=None, vllm_llm_kwargs='{"dtype": "float32"}',
                     use_vllm=True, image_skip_marker=None)
    assert config.vllm_llm_kwargs == {"dtype": "float32"}  # JSON text from a recipe / the command line


CHOICES = {
    "loss_type": ("gjsd", "sampled_reverse_kl"),
    "jsd_clip_form": ("reference", "nonnegative"),
    "loss_normalization": ("tokens", "samples"),
    "teacher_mode": ("self", "ema", "fixed"),
    "vt_source": ("cache", "online"),
    "on_missing_vt": ("error", "no_vt_teacher"),
    "noise_vt_space": ("pixels", "embeddings"),
}


@pytest.mark.parametrize("name", list(CHOICES))
def test_every_choice_is_accepted(name, tmp_path):
    for choice in CHOICES[name]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. noise_vt_space without noise_vt
            config = _config(tmp_path, **{name: choice}, vt_cache_dir=str(tmp_path))
        assert getattr(config, name) == choice


def test_help_lists_the_choices_and_the_command_line_refuses_others(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for name, choices in CHOICES.items():
        assert f"--{name} {{{','.join(choices)}}}" in help_text, name
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--output_dir", "unused", "--teacher_mode", "frozen"])
    assert exit_info.value.code == 2
    assert "argument --teacher_mode/--teacher-mode: invalid choice: 'frozen'" in capsys.readouterr().err


# (settings, the options that must be named as ignored)
IGNORED = {
    "sampled_reverse_kl": (dict(loss_type="sampled_reverse_kl", beta=0.2, teacher_top_k=None, jsd_clip=0.1),
                           ["beta=0.2", "teacher_top_k=None", "jsd_clip=0.1"]),
    "ema_decay without ema": (dict(teacher_mode="fixed", ema_decay=0.9), ["ema_decay=0.9"]),
    "noise_vt_space without noise_vt": (dict(noise_vt_space="embeddings"), ["noise_vt_space='embeddings'"]),
    "jsd_clip_form without a clip": (dict(jsd_clip=None, jsd_clip_form="nonnegative"),
                                     ["jsd_clip_form='nonnegative'"]),
    "cache folder online": (dict(vt_source="online", vt_cache_dir="cache", allow_trainable_vision_with_cache=True),
                            ["vt_cache_dir='cache'", "allow_trainable_vision_with_cache=True"]),
    "marker without skips": (dict(max_image_skips=0, image_skip_marker="<think>"), ["image_skip_marker='<think>'"]),
    "skips without marker": (dict(image_skip_marker=None, max_image_skips=2), ["max_image_skips=2"]),
    "vllm options without vllm": (dict(vllm_llm_kwargs={"dtype": "float32"}), ["vllm_llm_kwargs="]),
    "closing under the default loss": (dict(close_truncated_completions=False), ["close_truncated_completions=False"]),
}


@pytest.mark.parametrize("case", list(IGNORED))
def test_ignored_options_draw_one_warning_naming_them(case, tmp_path):
    settings, named = IGNORED[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _config(tmp_path, **settings)
    messages = [str(w.message) for w in caught if "VisualOPSDConfig" in str(w.message)]
    assert len(messages) == 1, messages
    for option in named:
        assert option in messages[0], (option, messages[0])
    assert caught[0].filename == __file__  # attributed to the code that built the config


@pytest.mark.parametrize("settings", [
    dict(loss_type="sampled_reverse_kl"),  # the ignored options at their defaults
    dict(teacher_mode="fixed"), dict(jsd_clip=None), dict(max_image_skips=0), dict(max_image_skips=0,
                                                                                   image_skip_marker=None),
    dict(noise_vt=True, noise_vt_space="embeddings"), dict(teacher_mode="ema", ema_decay=0.9),
    dict(loss_type="sampled_reverse_kl", close_truncated_completions=False),
], ids=str)
def test_effective_or_default_options_draw_no_warning(settings, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _config(tmp_path, **settings)


@pytest.mark.parametrize(("mode", "peft", "copy"), [
    ("self", False, False), ("self", True, False), ("ema", False, True), ("ema", True, True),
    ("fixed", False, True), ("fixed", True, False),  # under LoRA the fixed teacher is the base model
])
def test_teacher_copy_rule(mode, peft, copy, tmp_path):
    assert _config(tmp_path, teacher_mode=mode).needs_teacher_copy(peft=peft) is copy
