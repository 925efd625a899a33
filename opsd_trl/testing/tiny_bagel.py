"""A tiny random BAGEL built in code (no downloads), and a writer of BAGEL's own release layout.

Sizes: LLM 2 layers x hidden 64 (2 heads of 32, 1 KV head, qk-norm); SigLIP 2 layers x hidden 32, patch 14,
8 x 8 position table; images resized to 28..56 px, so at most 16 tokens per image. Same tokenizer as the other
tiny models (`opsd_trl.testing.tiny_models`), with BAGEL's chat format. A saved folder (`save_tiny`) loads with
`opsd_trl.models.loading.load_pretrained`.
"""

from __future__ import annotations

import os

import torch
from transformers import GenerationConfig

from ..models.bagel.configuration_bagel import BagelConfig
from ..models.bagel.modeling_bagel import BagelForConditionalGeneration
from ..models.bagel.processing_bagel import CHAT_TEMPLATE, BagelImageProcessor, BagelProcessor
from .tiny_models import build_tiny_tokenizer


def tiny_bagel_config(tok, **overrides) -> BagelConfig:
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>",
                                                     "<|im_end|>", "<|im_start|>")}
    kwargs = dict(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, rope_theta=10000.0,
                         max_position_embeddings=4096),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=112, patch_size=14),
        vit_max_num_patch_per_side=8,
        image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|im_end|>"],
        bos_token_id=ids["<|im_start|>"],
    )
    kwargs.update(overrides)
    return BagelConfig(**kwargs)


def build_tiny_bagel(seed: int = 0, **overrides) -> tuple[BagelForConditionalGeneration, BagelProcessor]:
    """`(model, processor)`, fp32, eval mode, greedy generation config stopping on `<|im_end|>`."""
    tok = build_tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    config = tiny_bagel_config(tok, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BagelForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
        do_sample=False, max_new_tokens=16,
    )
    image_processor = BagelImageProcessor(max_image_size=56, min_image_size=28, patch_size=14, max_pixels=56 * 56)
    return model.float().eval(), BagelProcessor(image_processor, tok, chat_template=CHAT_TEMPLATE)


def save_bagel_release(path: str | os.PathLike, weight_sets: dict, processor) -> str:
    """Write models in BAGEL's own release layout (what BAGEL-7B-MoT / ThinkMorph-7B folders hold): `llm_config.json`
    (Qwen2), `vit_config.json` (SigLIP, with the layer BAGEL drops: depth + 1), the tokenizer files, one
    `<name>.safetensors` per entry of `weight_sets` (`{"ema": model, "model": model}`) under BAGEL's weight names
    with the generation expert, the latent-path tensors and the stored `vit_pos_embed`, and the VAE
    (`ae.safetensors`). Tests and examples: `opsd_trl.models.loading.load_pretrained` reads it."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from ..models.bagel.convert import to_bagel_state_dict
    from ..models.bagel.modeling_bagel import sincos_2d

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    first = next(iter(weight_sets.values()))
    cfg = first.config
    t, v, h = cfg.text_config, cfg.vision_config, cfg.text_config.hidden_size
    side = cfg.vit_max_num_patch_per_side
    for name, model in weight_sets.items():
        weights = {k: w.detach().clone().contiguous() for k, w in to_bagel_state_dict(model).items()}
        gen = {}
        for k, w in weights.items():  # the generation expert: same shapes as the understanding expert
            for part in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "mlp", "input_layernorm",
                         "post_attention_layernorm"):
                if k.startswith("language_model.model.layers.") and f".{part}." in k:
                    gen[k.replace(f".{part}.", f".{part}_moe_gen.")] = torch.zeros_like(w)
                    break
        gen["language_model.model.norm_moe_gen.weight"] = torch.ones(h)
        gen.update({"latent_pos_embed.pos_embed": torch.zeros(16, h), "time_embedder.mlp.0.weight": torch.zeros(h, 8),
                    "vae2llm.weight": torch.zeros(h, 16), "llm2vae.weight": torch.zeros(16, h),
                    "vit_pos_embed.pos_embed": sincos_2d(torch.arange(side * side), h, side)})
        save_file({**weights, **gen}, str(folder / f"{name}.safetensors"))
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 4, 3, 3)},
              str(folder / "ae.safetensors"))
    (folder / "llm_config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim, "hidden_act": t.hidden_act,
        "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}, indent=2))
    (folder / "vit_config.json").write_text(json.dumps({
        "model_type": "siglip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers + 1, "num_attention_heads": v.num_attention_heads,
        "num_channels": v.num_channels, "image_size": v.image_size, "patch_size": v.patch_size,
        "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps}, indent=2))
    processor.tokenizer.save_pretrained(folder)
    return os.fspath(folder)
