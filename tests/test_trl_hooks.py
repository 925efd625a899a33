"""The TRL / transformers internals named in `opsd_trl.trl_hooks` still exist as used (pinned: trl==1.16.0), and
the workaround helpers behave as the Trainer they stand in for."""

import importlib
import inspect

import pytest
import torch
import trl
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback
from trl import DistillationTrainer

from opsd_trl import VisualOPSDTrainer, trl_hooks
from opsd_trl.trl_hooks import HOOKS


def _resolve(owner: str):
    module, _, qualname = owner.partition(":")
    obj = importlib.import_module(module)
    for part in filter(None, qualname.split(".")):
        obj = getattr(obj, part)
    return obj


def test_trl_is_the_pinned_version():
    assert trl.__version__ == "1.16.0", (
        f"trl {trl.__version__}: opsd_trl.trl_hooks was checked against trl 1.16.0; re-check every hook there "
        "(this file's tests name the ones that changed) before moving the pin."
    )


@pytest.mark.parametrize("hook", HOOKS, ids=[f"{h.owner}.{h.name}" for h in HOOKS])
def test_hook_exists_with_its_signature(hook):
    owner = _resolve(hook.owner)
    where = f"TRL/transformers hook {hook.owner} {hook.name!r} ({hook.reason})"
    if hook.params is None:
        assert hook.name in inspect.getsource(owner), f"{where}: no longer in the source of {hook.owner}"
        return
    assert hasattr(owner, hook.name), f"{where}: gone"
    params = tuple(inspect.signature(getattr(owner, hook.name)).parameters)
    assert params == hook.params, f"{where}: signature changed from {hook.params} to {params}"


def test_every_private_override_is_named():
    """A private method the trainer overrides must be listed (with its reason) in trl_hooks.HOOKS."""
    named = {h.name for h in HOOKS if h.params is not None}
    overridden = {n for n in vars(VisualOPSDTrainer) if n.startswith("_") and not n.startswith("__")
                  and callable(getattr(DistillationTrainer, n, None))}
    assert overridden <= named, f"overridden but not in trl_hooks.HOOKS: {sorted(overridden - named)}"


@pytest.mark.parametrize("strategy", ["steps", "no"])
@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("every", [1, 3])
def test_step_will_log_foresees_the_default_flow(strategy, first, every, tmp_path):
    """Known at the step's start, the same answer transformers' DefaultFlowCallback gives after it (the first step
    is always included: a run shorter than one interval still reports the diagnostics in its final log)."""
    args = TrainingArguments(output_dir=str(tmp_path), logging_strategy=strategy, logging_steps=every,
                             logging_first_step=first, report_to=[])
    state = TrainerState()
    state.compute_steps(args, max_steps=20)
    for done in range(20):  # optimizer steps finished when the step in progress starts
        state.global_step = done
        foreseen = trl_hooks.step_will_log(args, state)
        state.global_step = done + 1
        control = DefaultFlowCallback().on_step_end(args, state, TrainerControl())
        assert foreseen == (control.should_log or done == 0), (done, foreseen)


def test_step_will_log_epoch_strategy_takes_each_epochs_first_step(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), logging_strategy="epoch", report_to=[])
    state = TrainerState()
    state.compute_steps(args, max_steps=8)
    picked = []
    for done in range(8):  # 4 steps per epoch; state.epoch as the training loop sets it before each step
        state.global_step, state.epoch = done, done / 4
        picked.append(trl_hooks.step_will_log(args, state))
    assert picked == [True, False, False, False, True, False, False, False]


def test_setting_helpers_restore_the_setting_even_on_error(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), save_total_limit=2, report_to=[])
    args.use_vllm = True
    with pytest.raises(RuntimeError), trl_hooks.parent_init_without_vllm(args) as use_vllm:
        assert use_vllm is True and args.use_vllm is False
        raise RuntimeError
    assert args.use_vllm is True
    with pytest.raises(RuntimeError), trl_hooks.rotation_deferred(args) as limit:
        assert limit == 2 and args.save_total_limit is None
        raise RuntimeError
    assert args.save_total_limit == 2


def test_empty_completions_travel_as_one_pad_token_and_are_masked():
    empty = trl_hooks.EmptyCompletions()
    assert empty.of(2) == [False, False]
    assert empty.fill([[5, 6], [], [7]], pad_token_id=0) == [[5, 6], [0], [7]]
    mask = torch.ones(3, 2, dtype=torch.long)
    assert empty.mask(mask) == 1 and mask.tolist() == [[1, 1], [0, 0], [1, 1]]
    empty.reset()
    assert empty.of(3) == [False] * 3


def test_vllm_llm_with_adds_engine_options_and_restores_the_constructor(monkeypatch):
    from trl.generation import vllm_generation

    calls = []

    def fake_llm(**kwargs):
        calls.append(kwargs)

    monkeypatch.setattr(vllm_generation, "LLM", fake_llm, raising=False)
    with trl_hooks.vllm_llm_with({"dtype": "float32", "max_num_batched_tokens": 1}):
        vllm_generation.LLM(model="m", max_num_batched_tokens=4096)
    assert calls == [{"model": "m", "max_num_batched_tokens": 1, "dtype": "float32"}]
    assert vllm_generation.LLM is fake_llm
