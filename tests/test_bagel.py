"""BAGEL understanding path (opsd_trl.models.bagel) on a tiny random config: forward, generate, layout, processor,
checkpoint name mapping, teacher splice, trainer steps, and the vLLM image convention it differs from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from trainer_utils import completion_logits, generation_batch, make_trainer, reference_teacher_logits, vl_dataset

from opsd_trl.markers import IMAGE_SKIP_MARKER
from opsd_trl.models.adapters import get_adapter
from opsd_trl.models.bagel.adapter import BagelAdapter
from opsd_trl.models.bagel.convert import convert_bagel_checkpoint, load_bagel_checkpoint, to_bagel_state_dict
from opsd_trl.models.bagel.layout import bagel_attention_mask, bagel_position_ids, image_blocks
from opsd_trl.models.loading import load_pretrained
from opsd_trl.teacher_context import teacher_messages
from opsd_trl.testing.tiny_bagel import build_tiny_bagel
from opsd_trl.testing.tiny_models import save_tiny

ATOL = 1e-5


def _image(seed=0, size=(56, 42)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def _prompt(processor, n_images=1, text="Which way?"):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_bagel(seed=0)


# ----------------------------------------------------------------------------------------------- layout


def _reference_layout(segments, pad):
    """BAGEL's packing written out directly: text splits take consecutive RoPE ids and attend causally; an image
    split ([start, patches, end]) takes one RoPE id for all its tokens, attends fully inside, and the next split
    starts at that id + 1. Left padding of `pad` tokens (never attended, position 0)."""
    kinds, pos, split_of, rope = [], [], [], 0
    for i, (kind, n) in enumerate(segments):
        if kind == "text":
            pos += list(range(rope, rope + n))
            rope += n
        else:
            pos += [rope] * n
            rope += 1
        kinds += [kind] * n
        split_of += [i] * n
    length = pad + len(kinds)
    mask = torch.zeros(length, length, dtype=torch.bool)
    for q in range(pad, length):
        for k in range(pad, length):
            sq, sk = split_of[q - pad], split_of[k - pad]
            mask[q, k] = k <= q or (sq == sk and kinds[q - pad] == "image")
    for i in range(pad):
        mask[i, i] = True  # padding queries see themselves only (their output is ignored)
    return torch.tensor([0] * pad + pos), mask


def test_layout_matches_direct_construction(tiny):
    model, _ = tiny
    cfg = model.config
    vs, ve, img, txt = cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, 65
    segments = [("text", 3), ("image", 2 + 4), ("text", 2), ("image", 2 + 3), ("image", 2 + 1), ("text", 4)]
    pad = 2
    ids = [cfg.pad_token_id] * pad
    for kind, n in segments:
        ids += [txt] * n if kind == "text" else [vs] + [img] * (n - 2) + [ve]
    ids = torch.tensor([ids])
    attn = (torch.arange(ids.shape[1]) >= pad).long()[None]
    ref_pos, ref_mask = _reference_layout(segments, pad)
    blocks = image_blocks(ids, ids == img, vs, ve)
    assert blocks.max().item() == 3  # adjacent images stay separate blocks
    torch.testing.assert_close(bagel_position_ids(blocks, attn)[0], ref_pos)
    torch.testing.assert_close(bagel_attention_mask(blocks, attn)[0, 0], ref_mask)
    # With a cache: the last 5 tokens as queries over all keys give the same rows.
    tail = bagel_attention_mask(blocks[:, -5:], attn, past_length=ids.shape[1] - 5)
    torch.testing.assert_close(tail[0, 0], ref_mask[-5:])
    # vLLM's convention: sequential positions, causal.
    seq = bagel_position_ids(blocks, attn, shared=False)[0]
    torch.testing.assert_close(seq[pad:], torch.arange(ids.shape[1] - pad))
    causal = bagel_attention_mask(blocks, attn, bidirectional=False)[0, 0]
    assert not causal[pad + 3, pad + 4]  # first block token does not see the next one
    # A <|vision_start|> that touches no image token (e.g. sampled text) is text.
    stray = torch.tensor([[txt, vs, txt, ve, txt]])
    assert image_blocks(stray, stray == img, vs, ve).sum() == 0


def test_model_attention_follows_blocks(tiny):
    """Changing the last patch of an image changes the first patch's hidden state (bidirectional block) but not
    the text before the image (causal), in the model itself."""
    model, processor = tiny
    enc = processor(text=[_prompt(processor)], images=[[_image(0)]], return_tensors="pt")
    h1 = model.model(**enc).last_hidden_state
    pv = enc["pixel_values"].clone()
    pv[-1] += 1.0
    h2 = model.model(**{**enc, "pixel_values": pv}).last_hidden_state
    first_patch = int(enc["mm_token_type_ids"][0].nonzero()[0])
    assert (h1[0, first_patch] - h2[0, first_patch]).abs().max() > 1e-4
    torch.testing.assert_close(h1[0, : first_patch - 1], h2[0, : first_patch - 1])


# ----------------------------------------------------------------------------------------------- processor


def test_processor_transform_and_chat_format(tiny):
    _, processor = tiny
    text = _prompt(processor)
    assert text == "<|vision_start|><|image_pad|><|vision_end|><|im_start|>Which way?<|im_end|><|im_start|>"
    im = _image(1, size=(70, 40))  # short edge 40 -> 42 (multiple of 14 after scaling), long edge capped at 56
    enc = processor(text=[text], images=[[im]], return_tensors="pt")
    (_, rows, cols), = enc["image_grid_thw"].tolist()
    assert (rows * 14, cols * 14) == (28, 56)
    assert int(enc["mm_token_type_ids"].sum()) == rows * cols == enc["pixel_values"].shape[0]
    # Patches: (row, col, channel) within a patch, row-major over the grid, scaled to [-1, 1].
    x = np.asarray(im.convert("RGB").resize((56, 28), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    expected = torch.tensor(np.stack([x[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14].reshape(-1)
                                      for r in range(rows) for c in range(cols)]))
    torch.testing.assert_close(enc["pixel_values"], expected, atol=1e-6, rtol=0)
    # Transparent pixels become white, as in BAGEL.
    rgba = Image.new("RGBA", (28, 28), (0, 0, 0, 0))
    assert processor.image_processor(rgba)["pixel_values"].min() == 1.0
    # The image-skip marker survives decoding (the generation rounds search decoded text for it).
    tok = processor.tokenizer
    ids = tok("<think>x</think>" + IMAGE_SKIP_MARKER, add_special_tokens=False)["input_ids"]
    assert IMAGE_SKIP_MARKER in tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------- forward, generate


def test_forward_padding_and_generate(tiny, tmp_path):
    model, processor = tiny
    texts = [_prompt(processor, 1, "Left?"), _prompt(processor, 2, "Which of the two is larger?")]
    images = [[_image(2)], [_image(3, (42, 56)), _image(4, (28, 28))]]
    processor.tokenizer.padding_side = "left"
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    for b in range(2):  # left padding changes nothing
        single = processor(text=[texts[b]], images=[images[b]], return_tensors="pt")
        n = single["input_ids"].shape[1]
        torch.testing.assert_close(model(**single).logits[0], logits[b, -n:], atol=ATOL, rtol=1e-4)
    # generate (KV cache) == greedy decoding by full forwards without a cache.
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    ids, mm = batch["input_ids"], batch["mm_token_type_ids"]
    attn = batch["attention_mask"]
    for _ in range(6):
        step = model(input_ids=ids, attention_mask=attn, pixel_values=batch["pixel_values"],
                     image_grid_thw=batch["image_grid_thw"],
                     mm_token_type_ids=torch.nn.functional.pad(mm, (0, ids.shape[1] - mm.shape[1]))).logits
        ids = torch.cat([ids, step[:, -1:].argmax(-1)], dim=1)
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
    ref = ids[:, batch["input_ids"].shape[1]:]
    for b in range(2):  # generate stops a row at EOS; compare up to there
        got = out[b, batch["input_ids"].shape[1]:].tolist()
        eos = next((i + 1 for i, t in enumerate(got) if t == model.config.eos_token_id), len(got))
        assert got[:eos] == ref[b, :eos].tolist()
    # save / load round trip
    model2, processor2 = load_pretrained(save_tiny(model, processor, tmp_path / "hf"))
    torch.testing.assert_close(model2(**processor2(text=[texts[0]], images=[images[0]], return_tensors="pt")).logits,
                               model(**processor(text=[texts[0]], images=[images[0]], return_tensors="pt")).logits)


def test_gradient_checkpointing_same_gradients():
    model, processor = build_tiny_bagel(seed=1)
    enc = processor(text=[_prompt(processor)], images=[[_image(5)]], return_tensors="pt")
    model.train()

    def grads():
        model.zero_grad()
        model(**enc, labels=enc["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    ckpt = grads()
    assert plain.keys() == ckpt.keys() and "model.visual.vision_model.embeddings.patch_embedding.weight" in plain
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)


# ----------------------------------------------------------------------------------------------- checkpoint mapping


def _bagel_name(hf_name: str) -> str:
    """BAGEL's naming, written out independently of opsd_trl.models.bagel.convert."""
    for hf, bagel in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                      ("model.visual.vision_model.", "vit_model.vision_model."),
                      ("model.visual.connector.", "connector.")):
        if hf_name.startswith(hf):
            return bagel + hf_name[len(hf):]
    raise KeyError(hf_name)


def _write_fake_checkpoint(model, processor, folder, conv_patch: bool):
    folder.mkdir(parents=True)
    cfg = model.config
    weights = {_bagel_name(k): v.clone() for k, v in model.state_dict().items()}
    if conv_patch:  # the original SigLIP conv layout (out, c, p, p)
        key = "vit_model.vision_model.embeddings.patch_embedding.weight"
        w = weights[key]
        weights[key] = w.reshape(w.shape[0], 14, 14, 3).permute(0, 3, 1, 2).contiguous()
    gen = {}
    for k, v in weights.items():  # the generation expert mirrors the understanding expert's LLM weights
        if k.startswith("language_model.model.layers.") and ("self_attn" in k or "mlp" in k or "layernorm" in k):
            for part in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "mlp", "input_layernorm",
                         "post_attention_layernorm"):
                if f".{part}." in k:
                    gen[k.replace(f".{part}.", f".{part}_moe_gen.")] = torch.randn_like(v)
                    break
    gen["language_model.model.norm_moe_gen.weight"] = torch.ones(cfg.text_config.hidden_size)
    h = cfg.text_config.hidden_size
    gen.update({"latent_pos_embed.pos_embed": torch.zeros(16, h), "time_embedder.mlp.0.weight": torch.zeros(h, 256),
                "vae2llm.weight": torch.zeros(h, 64), "llm2vae.weight": torch.zeros(64, h)})
    side = cfg.vit_max_num_patch_per_side
    from opsd_trl.models.bagel.modeling_bagel import sincos_2d

    weights["vit_pos_embed.pos_embed"] = sincos_2d(torch.arange(side * side), h, side)
    items = sorted({**weights, **gen}.items())
    half = len(items) // 2
    save_file(dict(items[:half]), str(folder / "model-00001-of-00002.safetensors"))
    save_file(dict(items[half:]), str(folder / "model-00002-of-00002.safetensors"))
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 4, 3, 3)},
              str(folder / "ae.safetensors"))
    t, v = cfg.text_config, cfg.vision_config
    (folder / "llm_config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim, "hidden_act": "silu",
        "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta, "tie_word_embeddings": False}))
    (folder / "vit_config.json").write_text(json.dumps({
        "model_type": "siglip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers + 1, "num_attention_heads": v.num_attention_heads,
        "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": v.layer_norm_eps}))
    processor.tokenizer.save_pretrained(folder)
    return weights, gen


@pytest.mark.parametrize("conv_patch", [False, True], ids=["linear-patch", "conv-patch"])
def test_checkpoint_mapping_round_trip(conv_patch, tiny, tmp_path, caplog):
    model, processor = tiny
    src = tmp_path / "bagel"
    weights, gen = _write_fake_checkpoint(model, processor, src, conv_patch)
    loaded, report = load_bagel_checkpoint(src)
    assert report["ignored"] == {"generation expert": sum("moe_gen" in k for k in gen),
                                 "generation / diffusion": 4, "VAE": 2}
    for name, ref in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], ref, atol=0, rtol=0, msg=name)
    assert loaded.config.vision_config.num_hidden_layers == model.config.vision_config.num_hidden_layers
    # Back to BAGEL names: exactly the understanding-path names of the checkpoint.
    exported = to_bagel_state_dict(loaded)
    assert set(exported) == set(weights) - {"vit_pos_embed.pos_embed"}
    # Converter: a plain HF folder that loads and computes the same logits.
    dst = convert_bagel_checkpoint(src, tmp_path / "hf", image_processor=processor.image_processor)
    hf_model, hf_processor = load_pretrained(dst)
    enc = hf_processor(text=[_prompt(hf_processor)], images=[[_image(6)]], return_tensors="pt")
    assert enc["input_ids"].tolist() == processor(text=[_prompt(processor)], images=[[_image(6)]],
                                                  return_tensors="pt")["input_ids"].tolist()
    torch.testing.assert_close(hf_model(**enc).logits, model(**enc).logits, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------- trainer


def test_teacher_splice_equals_plain_forward(tmp_path):
    model, processor = build_tiny_bagel(seed=0)
    assert isinstance(get_adapter(model), BagelAdapter)
    dataset = vl_dataset(n=2, n_vt=2)
    trainer = make_trainer(model, processor, dataset, tmp_path, teacher_mode="self", max_completion_length=5)
    batch = generation_batch(trainer, dataset)
    ours = completion_logits(trainer, batch)
    model.eval()
    for b, ref in enumerate(reference_teacher_logits(model, processor, dataset, batch, trainer.args)):
        torch.testing.assert_close(ours[b, : ref.shape[0]], ref, atol=1e-4, rtol=1e-4)
    student = completion_logits(trainer, batch, teacher=False)
    assert (student - ours).abs().max() > 1e-3  # the visual thoughts matter


@pytest.mark.parametrize("mode", ["ema", "self"])
def test_trainer_steps(mode, tmp_path):
    model, processor = build_tiny_bagel(seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(model, processor, vl_dataset(n=4, n_vt=2), tmp_path, teacher_mode=mode,
                           gradient_checkpointing=mode == "self")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] > 0
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any("language_model" in n for n in changed) and any("visual" in n for n in changed)


# ----------------------------------------------------------------------------------------------- vLLM convention


def test_vllm_convention_differs_measurably():
    """vLLM's BagelForConditionalGeneration: sequential positions + causal attention over image tokens. Same weights,
    same inputs: text-only logits agree exactly; after an image they do not (numbers in docs/models.md)."""
    native, processor = build_tiny_bagel(seed=0)
    vllm_like, _ = build_tiny_bagel(seed=0, image_rope="sequential", image_attention="causal")
    text_only = processor(text=["<|im_start|>Hello there<|im_end|><|im_start|>"], return_tensors="pt")
    torch.testing.assert_close(native(**text_only).logits, vllm_like(**text_only).logits, atol=0, rtol=0)
    enc = processor(text=[_prompt(processor)], images=[[_image(7)]], return_tensors="pt")
    after = enc["mm_token_type_ids"][0].nonzero().max().item() + 1
    diff = (native(**enc).logits - vllm_like(**enc).logits)[0, after:].abs().max().item()
    assert diff > 1e-3


# ----------------------------------------------------------------------------------------------- ZeRO-3


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_two_processes_equal_one(tmp_path):
    """Visual-OPSD on the tiny BAGEL under ZeRO-3 on 2 CPU processes == 1 process (losses, grad norms, weights)."""
    import subprocess
    import sys

    from distributed import SCRIPTS, launch, launch_env
    from safetensors.torch import load_file

    model_dir = save_tiny(*build_tiny_bagel(seed=0), tmp_path / "model")
    dist = launch("train_bagel", "cpu_zero3", ["--model-dir", model_dir], tmp_path / "dist", timeout=900)
    out = tmp_path / "single" / "result.json"
    out.parent.mkdir()
    proc = subprocess.run([sys.executable, str(SCRIPTS / "train_bagel.py"), "--out", str(out), "--model-dir", model_dir],
                          env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    single = json.loads(out.read_text())
    assert dist["world_size"] == 2 and single["loss"][0] > 0
    for a, b in zip(dist["loss"], single["loss"], strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    for a, b in zip(dist["grad_norm"], single["grad_norm"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    w_dist, w_single = load_file(dist["weights"]), load_file(single["weights"])
    assert w_dist.keys() == w_single.keys()
    for name, ref in w_single.items():
        # Attention key biases get an analytically zero gradient (softmax ignores a per-query constant): they stay
        # at ~1e-17 of rounding noise, hence the absolute floor.
        atol = max(1e-5 * ref.abs().max().item(), 1e-8)
        torch.testing.assert_close(w_dist[name], ref, rtol=1e-5, atol=atol, msg=name)
    assert dist["shadow_numel"] < 0.6 * sum(t.numel() for t in w_single.values())  # the EMA teacher is sharded


def test_eval_teacher_context_logits(tmp_path):
    """opsd_trl.eval's teacher-context logits (its own splice through the adapter) equal the plain forward."""
    from opsd_trl.eval import Contexts
    from opsd_trl.eval import completion_logits as eval_logits

    model, processor = build_tiny_bagel(seed=0)
    row = vl_dataset(n=1, n_vt=2)[0]
    contexts = Contexts(processor, intro="Hints:", transition="Now answer.")
    completion = processor.tokenizer("R", add_special_tokens=False)["input_ids"] + [model.config.eos_token_id]
    logits, _ = eval_logits(model, contexts, [row], [completion], teacher=True)
    msgs = teacher_messages(row["prompt"], n_vt=2, intro="Hints:", transition="Now answer.")
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=[row["images"] + row["vt_images"]], return_tensors="pt")
    ids = torch.cat([enc["input_ids"], torch.tensor([completion])], dim=1)
    mm = torch.nn.functional.pad(enc["mm_token_type_ids"], (0, len(completion)))
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                    mm_token_type_ids=mm).logits
    torch.testing.assert_close(logits[0], ref[0, -len(completion) - 1: -1], atol=1e-4, rtol=1e-4)


def test_vt_cache_round_trip_and_trainer_with_cache(tmp_path):
    """BAGEL VTs built into a real VT cache give the same teacher logits as encoding them online."""
    from opsd_trl.vt_cache import VisionEncoder, build_vt_cache

    model, processor = build_tiny_bagel()
    dataset = vl_dataset(n=2)
    online = make_trainer(model, processor, dataset, tmp_path, teacher_mode="self")
    batch = generation_batch(online, dataset)
    expected = completion_logits(online, batch)
    cache_dir = build_vt_cache(dataset, VisionEncoder(model, processor), tmp_path / "cache", progress=False)
    model.model.visual.requires_grad_(False)
    cached = make_trainer(model, processor, dataset, tmp_path, teacher_mode="self", vt_cache_dir=str(cache_dir))
    rows = [dataset[i] for i in range(2)]
    ordered = [rows[[r["id"] for r in rows].index(s)] for s in batch["sample_ids"]]
    batch.update(cached._teacher_batch(ordered, {"num_images": batch.get("num_images"),
                                                 "image_grid_thw": batch.get("image_grid_thw"),
                                                 "prompt_mask": batch["prompt_mask"]}))
    assert all(p is None for p in batch["vt_pixels"])
    torch.testing.assert_close(completion_logits(cached, batch), expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- release folders


def test_release_folder_weight_choice(bagel_release_dir, tmp_path):
    """A folder with ema.safetensors and model.safetensors loads the chosen set through the one loader; without a
    choice it is an error naming both files; the converter takes the same choice."""
    import shutil

    from opsd_trl.models.bagel.convert import bagel_config, weight_files
    from opsd_trl.models.loading import load_pretrained

    model_ref, ema_ref = build_tiny_bagel(seed=0)[0], build_tiny_bagel(seed=1)[0]
    for choice, ref in (("model", model_ref), ("ema", ema_ref)):
        loaded, processor = load_pretrained(bagel_release_dir, dtype="float32", bagel_weights=choice)
        for name, t in ref.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], t), (choice, name)
        assert type(processor).__name__ == "BagelProcessor" and processor.image_processor.max_pixels == 2_007_040
    with pytest.raises(ValueError, match=r"ema\.safetensors .*model\.safetensors.*bagel_weights"):
        load_pretrained(bagel_release_dir)
    with pytest.raises(ValueError, match="must be 'ema' or 'model'"):
        weight_files(bagel_release_dir, "last")
    config = bagel_config(bagel_release_dir, weights="model")  # from the headers, no tensor read
    assert config.vision_config.num_hidden_layers == model_ref.config.vision_config.num_hidden_layers
    assert config.text_config.vocab_size == model_ref.config.text_config.vocab_size
    # One set only: no choice needed; the other set asked for is an error naming what is there.
    single = tmp_path / "single"
    shutil.copytree(bagel_release_dir, single)
    (single / "ema.safetensors").unlink()
    assert [p.name for p in weight_files(single)] == ["model.safetensors"]
    with pytest.raises(FileNotFoundError, match=r"no ema\*\.safetensors"):
        weight_files(single, "ema")
    # A stray copy of a tensor in a second file of the set is an error, not "last file wins".
    shutil.copy(single / "model.safetensors", single / "model-copy.safetensors")
    with pytest.raises(ValueError, match="is in both"):
        load_bagel_checkpoint(single)
    dst = convert_bagel_checkpoint(bagel_release_dir, tmp_path / "hf", weights="ema")
    converted, _ = load_pretrained(dst)
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in ema_ref.state_dict().items())


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_attention_equals_dense(chunk):
    """query_chunk_size (query chunks, mask built per chunk, K/V not repeated) == the dense (L, L) mask path,
    with images, left padding, gradients and a KV cache."""
    model, processor = build_tiny_bagel(seed=0)
    chunked, _ = build_tiny_bagel(seed=0)
    chunked.config.text_config.query_chunk_size = chunk
    texts = [_prompt(processor, n_images=2), _prompt(processor, n_images=1, text="Short?")]
    enc = processor(text=texts, images=[[_image(1), _image(2, (42, 56))], [_image(3)]], padding=True,
                    padding_side="left", return_tensors="pt")
    dense_out, chunk_out = model(**enc).logits, chunked(**enc).logits
    valid = enc["attention_mask"].bool()
    torch.testing.assert_close(chunk_out[valid], dense_out[valid], atol=2e-5, rtol=1e-5)
    chunk_out[valid].square().sum().backward()
    dense_out[valid].square().sum().backward()
    for (name, a), (_, b) in zip(chunked.named_parameters(), model.named_parameters(), strict=True):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)
    gen = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(chunked.generate(**enc, **gen), model.generate(**enc, **gen))


# ----------------------------------------------------------------------------------------------- upstream golden

GOLDEN = Path(__file__).parent / "fixtures" / "bagel_golden"  # checkpoint/: the release folder
GOLDEN_ATOL = 1e-4  # fp32 on both sides; logits are O(1) (|max| ~4.5), so this is ~2e-5 relative


def test_golden_upstream_logits():
    """The port against upstream BAGEL itself: `fixtures/bagel_golden` is a tiny random BAGEL release folder plus the
    logits that upstream's own inference path (ByteDance-Seed/Bagel, `make_golden.py`) computed for text, two images
    of different sizes, text and five greedy steps. Loaded through `load_pretrained` and fed through the project's
    processor, the port must reproduce upstream's token ids, ViT patches, RoPE positions, logits at every position
    (image tokens included) and greedy tokens (KV-cached generate)."""
    from safetensors.torch import load_file

    from opsd_trl.models.loading import apply_image_processor_kwargs, load_pretrained

    meta = json.loads((GOLDEN / "golden.json").read_text())
    gold = load_file(GOLDEN / "golden.safetensors")
    model, processor = load_pretrained(str(GOLDEN / "checkpoint"), dtype="float32")
    t = meta["vit_transform"]  # upstream ImageTransform(max, min, stride) with its default max_pixels
    apply_image_processor_kwargs(processor, {"max_image_size": t["max_image_size"],
                                             "min_image_size": t["min_image_size"], "max_pixels": 14 * 14 * 9 * 1024})
    text0, image0, image1, text1 = meta["sequence"]
    content = [{"type": "text", "text": text0}, {"type": "image"}, {"type": "image"}, {"type": "text", "text": text1}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
    images = [Image.open(GOLDEN / name) for name in (image0, image1)]
    enc = processor(text=[prompt], images=[images], return_tensors="pt")
    # Same inputs: upstream's prompt (its start token included), then the tokens it generated.
    assert enc["input_ids"].shape[1] == meta["prompt_length"] + 1
    assert enc["image_grid_thw"][:, 1:].tolist() == gold["image_grid"].tolist()
    torch.testing.assert_close(enc["pixel_values"], gold["pixel_values"], atol=1e-6, rtol=0)
    ids = torch.cat([enc["input_ids"], torch.tensor([meta["generated"]])], dim=1)
    mm = torch.nn.functional.pad(enc["mm_token_type_ids"], (0, len(meta["generated"])))
    expected_ids = gold["input_ids"].masked_fill(gold["input_ids"] == -1, model.config.image_token_id)
    assert ids[0].tolist() == expected_ids.tolist()
    _, positions = model.model.layout(ids, mm == 1, None)
    assert positions[0].tolist() == gold["position_ids"].tolist()
    with torch.no_grad():
        logits = model(input_ids=ids, mm_token_type_ids=mm, pixel_values=enc["pixel_values"],
                       image_grid_thw=enc["image_grid_thw"]).logits[0]
        err = (logits - gold["logits"]).abs().max().item()
        assert err < GOLDEN_ATOL, f"max |logit - upstream| = {err:.3g}"
        out = model.generate(**enc, max_new_tokens=len(meta["generated"]) + 1, do_sample=False)
        assert out[0, enc["input_ids"].shape[1]:].tolist() == [*meta["generated"], meta["next_token"]]
        # The fixture tells conventions apart: vLLM's (sequential positions, causal image blocks) is far off.
        model.config.image_rope, model.config.image_attention = "sequential", "causal"
        other = model(input_ids=ids, mm_token_type_ids=mm, pixel_values=enc["pixel_values"],
                      image_grid_thw=enc["image_grid_thw"]).logits[0]
    assert (other - gold["logits"]).abs().max().item() > 1000 * GOLDEN_ATOL
