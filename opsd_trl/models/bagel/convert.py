"""Load a BAGEL / ThinkMorph checkpoint folder and convert it to a plain HF folder (and back).

A BAGEL-7B-MoT / ThinkMorph-7B folder holds `llm_config.json` (Qwen2), `vit_config.json` (SigLIP), the Qwen2.5
tokenizer, the model weights in one or more `*.safetensors` (`ema.safetensors`, `model.safetensors` or shards),
and the FLUX VAE in `ae.safetensors`. Weight names (BAGEL -> this model):

| BAGEL | here |
|---|---|
| `language_model.model.{embed_tokens, layers.N.*, norm}.*` | `model.language_model.{...}` (understanding expert) |
| `language_model.lm_head.weight` | `lm_head.weight` |
| `vit_model.vision_model.{embeddings, encoder.layers.N, post_layernorm}.*` | `model.visual.vision_model.{...}` |
| `connector.fc{1,2}.*` | `model.visual.connector.fc{1,2}.*` |
| `vit_pos_embed.pos_embed` | not stored: the frozen 2D sin-cos table is recomputed (checked when present) |

Ignored, with a logged count: the generation expert (every name with `moe_gen`, e.g. `q_proj_moe_gen`,
`mlp_moe_gen`, `norm_moe_gen`), the diffusion / latent path (`latent_pos_embed`, `time_embedder`, `vae2llm`,
`llm2vae`), a SigLIP pooling head (`vit_model.vision_model.head`), and every tensor of `ae.safetensors`. The patch
embedding is accepted as BAGEL's linear `(D, p*p*3)` or as the original conv `(D, 3, p, p)` (permuted to (p, p, c)).
The vision depth is read from the weights (BAGEL drops SigLIP's last layer: 26 of 27).

Which weights: BAGEL's training code saves the trained weights as `model.safetensors` and their EMA as
`ema.safetensors` next to each other. BAGEL's demo (`app.py`) and evaluation load `ema.safetensors`; the Visual-OPSD
reference trains from `model.safetensors` (`--finetune_from_ema False`) and starts its EMA teacher from
`ema.safetensors` when the folder has one. A folder holding both is therefore ambiguous: `weights="ema" | "model"`
chooses, and without a choice loading is an error naming both files (never a merge of the two).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from transformers import AutoTokenizer
from transformers.utils import logging

from ...checkpoints import check_safetensors
from .configuration_bagel import BagelConfig
from .modeling_bagel import BagelForConditionalGeneration, sincos_2d, vit_position_ids
from .processing_bagel import CHAT_TEMPLATE, REFERENCE_IMAGE_TRANSFORM, BagelImageProcessor, BagelProcessor

logger = logging.get_logger(__name__)

VAE_FILE = "ae.safetensors"
# (BAGEL prefix, HF prefix); first match wins, so the more specific prefixes come first.
RENAMES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vit_model.vision_model.", "model.visual.vision_model."),
    ("connector.", "model.visual.connector."),
)
GENERATION_ONLY = ("latent_pos_embed.", "time_embedder.", "vae2llm.", "llm2vae.", "vit_model.vision_model.head.")
POS_EMBED = "vit_pos_embed.pos_embed"


def ignored_reason(name: str) -> str | None:
    """Why a BAGEL weight is not part of the understanding path (None: it is)."""
    if "moe_gen" in name:
        return "generation expert"
    if name.startswith(GENERATION_ONLY):
        return "generation / diffusion"
    if name == POS_EMBED:
        return "recomputed sin-cos"
    return None


def to_hf_name(name: str) -> str:
    for src, dst in RENAMES:
        if name.startswith(src):
            return dst + name[len(src) :]
    raise KeyError(f"unknown BAGEL weight {name!r}")


def to_bagel_name(name: str) -> str:
    for src, dst in RENAMES:
        if name.startswith(dst):
            return src + name[len(dst) :]
    raise KeyError(f"unknown weight {name!r}")


WEIGHT_CHOICES = ("ema", "model")
LLM_CONFIG, VIT_CONFIG = "llm_config.json", "vit_config.json"


def is_bagel_checkpoint(folder: str | os.PathLike) -> bool:
    """A BAGEL / ThinkMorph release folder (BAGEL's own layout, not a transformers folder): it has
    `llm_config.json` and `vit_config.json` (a `config.json` next to them does not make it a transformers folder)."""
    folder = Path(folder)
    return folder.is_dir() and (folder / LLM_CONFIG).is_file() and (folder / VIT_CONFIG).is_file()


def _group(folder: Path, stem: str, files: list[Path]) -> list[Path]:
    """The files of one weight set: those its `<stem>.safetensors.index.json` names, else every file of it."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return files


def weight_files(folder: str | os.PathLike, weights: str | None = None) -> list[Path]:
    """The `*.safetensors` of one weight set of a BAGEL folder: `weights="ema"` -> `ema*.safetensors`,
    `"model"` -> every other weight file (`model.safetensors` or its shards); `ae.safetensors` (the VAE) never.
    Without `weights` the folder must hold one set only."""
    folder = Path(folder)
    if weights is not None and weights not in WEIGHT_CHOICES:
        raise ValueError(f"bagel_weights must be 'ema' or 'model', got {weights!r}.")
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != VAE_FILE)
    sets = {"ema": [p for p in files if p.name.startswith("ema")],
            "model": [p for p in files if not p.name.startswith("ema")]}
    if weights is None:
        present = [w for w in WEIGHT_CHOICES if sets[w]]
        if len(present) == 2:
            raise ValueError(
                f"{folder} holds two weight sets, ema.safetensors ({len(sets['ema'])} file(s)) and model.safetensors "
                f"({len(sets['model'])} file(s)); choose one: bagel_weights: ema | model in the recipe (--bagel_weights "
                "on opsd-trl train, --bagel-weights on build-vt-cache, --weights on the converter). BAGEL's demo "
                "loads ema.safetensors; the Visual-OPSD reference trains from model.safetensors."
            )
        weights = present[0] if present else "model"
    if not sets[weights]:
        raise FileNotFoundError(f"{folder}: no {weights}*.safetensors with the model weights (bagel_weights="
                                f"{weights!r}; files here: {[p.name for p in files] or 'none'}).")
    return _group(folder, weights, sets[weights])


def read_bagel_state_dict(folder: str | os.PathLike, weights: str | None = None) -> tuple[dict, dict]:
    """`(hf_state_dict, report)`: the understanding-path tensors under this model's names, and counts of what was
    ignored per reason (`report["ignored"]`) plus the stored `vit_pos_embed` if any (`report["pos_embed"]`).
    `weights`: "ema" | "model" | None (the folder's only weight set), see `weight_files`."""
    folder = Path(folder)
    state, ignored, pos_embed, source = {}, {}, None, {}
    files = weight_files(folder, weights)
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if name in source:
                    raise ValueError(f"BAGEL weight {name!r} is in both {source[name]} and {path.name}; a folder's "
                                     "weight set must hold each tensor once (choose bagel_weights: ema | model).")
                source[name] = path.name
                reason = ignored_reason(name)
                if reason == "recomputed sin-cos":
                    pos_embed = f.get_tensor(name)
                elif reason:
                    ignored[reason] = ignored.get(reason, 0) + 1
                else:
                    tensor = f.get_tensor(name)
                    if name.endswith("patch_embedding.weight") and tensor.ndim == 4:  # conv -> (p, p, c) linear
                        tensor = tensor.permute(0, 2, 3, 1).reshape(tensor.shape[0], -1)
                    state[to_hf_name(name)] = tensor
    report_files = [p.name for p in files]
    vae = folder / VAE_FILE
    if vae.exists():
        with safe_open(vae, framework="pt") as f:
            ignored["VAE"] = len(list(f.keys()))
    return state, {"ignored": ignored, "pos_embed": pos_embed, "files": report_files}


def read_bagel_shapes(folder: str | os.PathLike, weights: str | None = None) -> dict:
    """`{hf_name: shape}` of the understanding-path tensors, from the safetensors headers (no tensor is read)."""
    shapes = {}
    for path in weight_files(folder, weights):
        check_safetensors(path)  # safetensors' own error names no file
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if ignored_reason(name) is None:
                    shape = list(f.get_slice(name).get_shape())
                    if name.endswith("patch_embedding.weight") and len(shape) == 4:
                        shape = [shape[0], shape[1] * shape[2] * shape[3]]
                    shapes[to_hf_name(name)] = shape
    return shapes


def _token_ids(folder: Path) -> dict:
    defaults = {"image_token_id": 151655, "vision_start_token_id": 151652, "vision_end_token_id": 151653}
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return defaults
    names = {"image_token_id": "<|image_pad|>", "vision_start_token_id": "<|vision_start|>",
             "vision_end_token_id": "<|vision_end|>", "eos_token_id": "<|im_end|>", "pad_token_id": "<|im_end|>",
             "bos_token_id": "<|im_start|>"}
    return {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}


def bagel_config(folder: str | os.PathLike, state: dict | None = None, weights: str | None = None) -> BagelConfig:
    """`BagelConfig` from `llm_config.json` / `vit_config.json`, with sizes the weights fix read from them
    (`state`: tensors or shapes under this model's names; None: the shapes in the safetensors headers)."""
    folder = Path(folder)
    if state is None:
        state = {k: SimpleNamespace(shape=v) for k, v in read_bagel_shapes(folder, weights).items()}
    llm = json.loads((folder / LLM_CONFIG).read_text())
    vit = json.loads((folder / VIT_CONFIG).read_text())
    _refuse_rope_scaling(folder, llm)
    prefix = "model.visual.vision_model.encoder.layers."
    depth = 1 + max(int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix))
    if depth != vit.get("num_hidden_layers"):
        logger.info(f"BAGEL vision tower: {depth} layers in the weights (vit_config says {vit.get('num_hidden_layers')})")
    n_pos = state["model.visual.vision_model.embeddings.position_embedding.weight"].shape[0]
    side = round(n_pos**0.5)
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                 "rope_theta")
    vit_keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_channels", "patch_size",
                "hidden_act", "layer_norm_eps")
    text = {k: llm[k] for k in text_keys if llm.get(k) is not None}
    text["vocab_size"] = state["model.language_model.embed_tokens.weight"].shape[0]
    vision = {k: vit[k] for k in vit_keys if vit.get(k) is not None}
    vision.update(num_hidden_layers=depth, image_size=side * vision.get("patch_size", 14))
    return BagelConfig(text_config={**text, "qk_norm": True}, vision_config=vision, vit_max_num_patch_per_side=side,
                       **_token_ids(folder))


def _refuse_rope_scaling(folder: Path, llm: dict) -> None:
    """Upstream BAGEL applies `rope_scaling` (its Qwen2 LM builds `Qwen2RotaryEmbedding(config)`, which scales the
    RoPE frequencies by type); this port computes plain RoPE from `rope_theta`, so a scaled checkpoint is refused
    rather than run with other logits."""
    scaling = llm.get("rope_scaling")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if scaling and kind != "default":
        raise ValueError(f"{folder / LLM_CONFIG} sets rope_scaling={scaling!r}: upstream BAGEL scales its RoPE by "
                         "it, this port does not (its logits would differ); remove rope_scaling from llm_config.json "
                         "only if the checkpoint was trained without it, else run it with upstream BAGEL's code.")


def vit_patch_size(folder: str | os.PathLike) -> int:
    """The ViT patch size of a release folder (`vit_config.json`; SigLIP's default 14 when absent)."""
    return int(json.loads((Path(folder) / VIT_CONFIG).read_text()).get("patch_size", 14))


def _check_pos_embed(pos_embed: torch.Tensor | None, config: BagelConfig) -> None:
    if pos_embed is None:
        return
    side = config.vit_max_num_patch_per_side
    ids = vit_position_ids(torch.tensor([[1, side, side]]), side)
    ref = sincos_2d(ids, config.text_config.hidden_size, side)
    err = (pos_embed.float() - ref).abs().max().item()
    if err > 1e-2:  # bf16 storage rounds at ~4e-3
        logger.warning(f"stored vit_pos_embed differs from BAGEL's sin-cos table by {err:.3g}; using the recomputed one")


def load_bagel_checkpoint(folder: str | os.PathLike, dtype: torch.dtype | None = None, weights: str | None = None):
    """`(model, report)` from a BAGEL / ThinkMorph folder; logs which files were read, how many tensors were ignored
    and why. `weights`: "ema" | "model" | None (the folder's only weight set)."""
    state, report = read_bagel_state_dict(folder, weights)
    config = bagel_config(folder, state)
    _check_pos_embed(report["pos_embed"], config)
    with torch.device("meta"):
        model = BagelForConditionalGeneration(config)
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    counts = ", ".join(f"{n} {why}" for why, n in sorted(report["ignored"].items())) or "none"
    logger.warning(f"BAGEL checkpoint {folder}: loaded {len(state)} tensors from {', '.join(report['files'])}; "
                   f"ignored {sum(report['ignored'].values())} ({counts})")
    return model.eval(), report


def to_bagel_state_dict(model) -> dict:
    """This model's weights under BAGEL's names (e.g. to run a Visual-OPSD student with BAGEL / ThinkMorph code,
    which also needs the checkpoint's generation-expert and VAE weights next to it)."""
    return {to_bagel_name(k): v for k, v in model.state_dict().items()}


# vLLM 0.31's `BagelForConditionalGeneration` builds its LLM as a plain Qwen2, which has no qk-norm: loading a
# `q_norm` / `k_norm` weight fails ("There is no module or parameter named 'layers.0.self_attn.k_norm' in
# Qwen2Model"), so these weights cannot reach it (docs/generation.md, "BAGEL through vLLM").
VLLM_UNSUPPORTED = (".self_attn.q_norm.", ".self_attn.k_norm.")


def to_vllm_bagel_name(name: str) -> str | None:
    """The name vLLM's BAGEL loads this model's weight `name` under (upstream BAGEL's), or None for the qk-norm
    weights, which vLLM's BAGEL lacks."""
    return None if any(s in name for s in VLLM_UNSUPPORTED) else to_bagel_name(name)


def save_for_vllm(model, tokenizer, path: str | os.PathLike) -> str:
    """A folder vLLM 0.31's `BagelForConditionalGeneration` loads: `config.json` (`model_type` "bagel", the
    `llm_config` / `vit_config` it reads, the tower at its real depth: vLLM corrects only a depth of 27 to 26),
    a SigLIP `preprocessor_config.json` at the tower's `image_size` (vLLM resizes every image to it), the tokenizer,
    and `model.safetensors` under upstream BAGEL's names without the qk-norm weights (`to_vllm_bagel_name`). What
    it serves differs from this model: no qk-norm, sequential positions and causal attention for image tokens."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    t, v = model.config.text_config, model.config.vision_config
    llm = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": t.vocab_size,
           "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
           "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
           "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim, "hidden_act": t.hidden_act,
           "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
           "rope_theta": t.rope_theta, "tie_word_embeddings": False}
    vit = {"model_type": "siglip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
           "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
           "num_channels": v.num_channels, "image_size": v.image_size, "patch_size": v.patch_size,
           "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps}
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["BagelForConditionalGeneration"], "model_type": "bagel", "llm_config": llm,
        "vit_config": vit, "vit_max_num_patch_per_side": model.config.vit_max_num_patch_per_side,
        "connector_act": "gelu_pytorch_tanh", "visual_gen": False, "visual_und": True,
        "torch_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "size": {"height": v.image_size, "width": v.image_size},
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, indent=2))
    state = {to_vllm_bagel_name(k): w.detach().clone().contiguous() for k, w in model.state_dict().items()}
    save_file({k: w for k, w in state.items() if k is not None}, str(folder / "model.safetensors"))
    tokenizer.save_pretrained(folder)
    return os.fspath(folder)


def as_vllm_serves_it(model) -> BagelForConditionalGeneration:
    """A copy of `model` computing what vLLM 0.31's BAGEL computes from the `save_for_vllm` folder: sequential
    positions and causal attention for image tokens, no qk-norm (the reference its logprobs are checked against)."""
    import copy

    config = copy.deepcopy(model.config)
    config.image_rope, config.image_attention, config.text_config.qk_norm = "sequential", "causal", False
    other = BagelForConditionalGeneration(config).to(next(model.parameters()).dtype)
    state = {k: v for k, v in model.state_dict().items() if to_vllm_bagel_name(k) is not None}
    other.load_state_dict(state, strict=True)
    return other.eval()


def bagel_processor(folder: str | os.PathLike, image_processor: BagelImageProcessor | None = None) -> BagelProcessor:
    """`BagelProcessor` of a BAGEL folder: its Qwen2.5 tokenizer with BAGEL's chat format, and the understanding
    transform at the Visual-OPSD reference's sizes (`REFERENCE_IMAGE_TRANSFORM`) unless one is given, with the
    patch size of `vit_config.json`."""
    tok = AutoTokenizer.from_pretrained(os.fspath(folder))
    tok.chat_template = CHAT_TEMPLATE
    patch = vit_patch_size(folder)  # the image stride and patch side follow the tower
    if image_processor is not None and image_processor.patch_size != patch:
        raise ValueError(f"image processor patch_size {image_processor.patch_size} differs from {folder / VIT_CONFIG} "
                         f"patch_size {patch}; build the processor with patch_size={patch}.")
    return BagelProcessor(image_processor or BagelImageProcessor(**REFERENCE_IMAGE_TRANSFORM, patch_size=patch), tok)


def convert_bagel_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype | None = None,
                             image_processor: BagelImageProcessor | None = None, weights: str | None = None) -> str:
    """Write a plain HF folder (config, safetensors, tokenizer with BAGEL's chat template, processor) to `dst`,
    loadable with `opsd_trl.models.loading.load_pretrained` or `BagelForConditionalGeneration.from_pretrained`."""
    model, _ = load_bagel_checkpoint(src, dtype, weights)
    model.save_pretrained(dst)
    bagel_processor(src, image_processor).save_pretrained(dst)
    return os.fspath(dst)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="BAGEL / ThinkMorph checkpoint folder -> HF folder")
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--weights", choices=list(WEIGHT_CHOICES), default=None,
                        help="which weight set of a folder holding both ema.safetensors and model.safetensors")
    args = parser.parse_args(argv)
    logging.set_verbosity_info()
    print(convert_bagel_checkpoint(args.src, args.dst, getattr(torch, args.dtype), weights=args.weights))


if __name__ == "__main__":
    main()
