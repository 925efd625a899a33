"""BAGEL's understanding path as a transformers `PreTrainedModel` (`BagelForConditionalGeneration`).

What is kept from BAGEL-7B-MoT (ByteDance-Seed/Bagel, `modeling/bagel/`): the Qwen2 decoder of the understanding
expert (q/k/v with bias, RMS qk-norm per head before RoPE, SwiGLU MLP), the SigLIP NaViT tower (linear patch
embedding over (p, p, c) patches, learned position embedding indexed by `row * max_patches_per_side + col`, full
attention inside each image, post-layernorm), the 2-layer MLP connector, and the frozen 2D sin-cos embedding added
after it. Image blocks follow `layout.py`. The generation expert (`*_moe_gen`), the VAE path and the diffusion
heads are not built: a Visual-OPSD policy only reads and writes text.

Everything that touches a weight goes through a module call (embedding lookups included), so ZeRO-3 can gather
parameters on use; the sin-cos tables and RoPE frequencies are recomputed, not stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_bagel import BagelConfig, BagelTextConfig, BagelVisionConfig
from .layout import LazyBagelMask, bagel_attention_mask, bagel_position_ids, image_blocks

# --------------------------------------------------------------------------------------------- shared pieces


class BagelRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Qwen2 RoPE tables `(B, L, head_dim)` for 1D positions, computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def sincos_2d(position_ids: torch.Tensor, dim: int, side: int) -> torch.Tensor:
    """BAGEL's frozen `PositionEmbedding` row for flattened patch positions `row * side + col`: first half encodes
    the column, second half the row (its meshgrid puts w first), each half [sin, cos] with 10000^(-k/(dim/4))."""
    row, col = (position_ids // side).double(), (position_ids % side).double()
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=position_ids.device, dtype=torch.float64) / (dim / 4))

    def half(p):
        out = p[:, None] * omega
        return torch.cat([out.sin(), out.cos()], dim=-1)

    return torch.cat([half(col), half(row)], dim=-1).float()  # stored as fp32 in BAGEL, cast with the model


def vit_position_ids(grid_thw: torch.Tensor, side: int, interpolate: bool = False) -> torch.Tensor:
    """Flattened 2D patch positions of each image, concatenated: `row * side + col` (BAGEL's "extrapolate"), or
    the rows/cols bucketed onto a `side x side` grid ("interpolate")."""
    out = []
    for _, h, w in grid_thw.tolist():
        rows, cols = torch.arange(h), torch.arange(w)
        if interpolate:
            edges = torch.arange(1 / side, 1.0, 1 / side)
            rows = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / h), edges, right=True)
            cols = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / w), edges, right=True)
        out.append((rows[:, None] * side + cols[None, :]).flatten())
    return torch.cat(out).to(grid_thw.device)


# --------------------------------------------------------------------------------------------- language model


class BagelTextAttention(nn.Module):
    def __init__(self, config: BagelTextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(h, self.num_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(h, self.num_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        norm = (lambda: BagelRMSNorm(self.head_dim, config.rms_norm_eps)) if config.qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        self.text_config = config

    def forward(self, x, cos, sin, mask, past_key_values: Cache | None = None):
        b, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, length, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, length, self.num_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, length, self.num_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        dropout = self.dropout if self.training else 0.0
        if isinstance(mask, LazyBagelMask):  # query chunks: mask and scores are (chunk, L), never (L, L)
            chunk = self.text_config.query_chunk_size
            # enable_gqa: the K/V heads are shared by their query groups without being repeated in memory.
            out = torch.cat([
                F.scaled_dot_product_attention(q[:, :, i : i + chunk], k, v,
                                               attn_mask=mask.rows(i, min(i + chunk, length)),
                                               dropout_p=dropout, enable_gqa=True)
                for i in range(0, length, chunk)
            ], dim=2)
        else:
            groups = self.num_heads // self.num_kv
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))


class BagelTextMLP(nn.Module):
    def __init__(self, config: BagelTextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class BagelDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: BagelTextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = BagelRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = BagelTextAttention(config, layer_idx)
        self.post_attention_layernorm = BagelRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = BagelTextMLP(config)

    def forward(self, hidden, cos, sin, mask, past_key_values=None):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, mask, past_key_values)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


# --------------------------------------------------------------------------------------------- vision tower


class BagelVisionEmbeddings(nn.Module):
    def __init__(self, config: BagelVisionConfig):
        super().__init__()
        self.patch_embedding = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size)
        self.position_embedding = nn.Embedding((config.image_size // config.patch_size) ** 2, config.hidden_size)

    def forward(self, patches, position_ids):
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class BagelVisionAttention(nn.Module):
    def __init__(self, config: BagelVisionConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.dropout = config.num_attention_heads, config.attention_dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, key_mask):
        b, n, d = x.shape

        def heads(t):
            return t.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class BagelVisionMLP(nn.Module):
    def __init__(self, config: BagelVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class BagelVisionLayer(GradientCheckpointingLayer):
    def __init__(self, config: BagelVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = BagelVisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = BagelVisionMLP(config)

    def forward(self, x, key_mask):
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class BagelVisionEncoder(nn.Module):
    def __init__(self, config: BagelVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([BagelVisionLayer(config) for _ in range(config.num_hidden_layers)])


class BagelVisionTransformer(nn.Module):
    """SigLIP NaViT. Images of different sizes are padded into one `(n_images, max_patches, D)` batch with a key
    mask, which is what BAGEL's varlen flash attention computes (attention never crosses images)."""

    def __init__(self, config: BagelVisionConfig):
        super().__init__()
        self.embeddings = BagelVisionEmbeddings(config)
        self.encoder = BagelVisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, patches, position_ids, seqlens: list[int]):
        x = self.embeddings(patches, position_ids)
        padded = nn.utils.rnn.pad_sequence(list(x.split(seqlens)), batch_first=True)
        key_mask = torch.arange(padded.shape[1], device=x.device)[None] < torch.tensor(seqlens, device=x.device)[:, None]
        for layer in self.encoder.layers:
            padded = layer(padded, key_mask)
        return self.post_layernorm(padded[key_mask])


class BagelConnector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(in_dim, out_dim), nn.Linear(out_dim, out_dim), ACT2FN[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class BagelVisual(nn.Module):
    """Everything between pixels and the rows that replace image tokens: tower, connector, 2D sin-cos."""

    def __init__(self, config: BagelConfig):
        super().__init__()
        self.vision_model = BagelVisionTransformer(config.vision_config)
        self.connector = BagelConnector(
            config.vision_config.hidden_size, config.text_config.hidden_size, config.connector_act
        )
        self.side = config.vit_max_num_patch_per_side
        self.interpolate = config.interpolate_pos
        self.out_dim = config.text_config.hidden_size

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """`pixel_values` `(sum patches, c*p*p)`, `image_grid_thw` `(n_images, 3)` -> `(sum patches, H)`."""
        pos = vit_position_ids(image_grid_thw, self.side, self.interpolate)
        seqlens = image_grid_thw.prod(-1).tolist()
        feats = self.connector(self.vision_model(pixel_values, pos, seqlens))
        return feats + sincos_2d(pos, self.out_dim, self.side).to(feats.dtype)


# --------------------------------------------------------------------------------------------- models


class BagelPreTrainedModel(PreTrainedModel):
    config_class = BagelConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BagelDecoderLayer", "BagelVisionLayer"]
    _supports_sdpa = True


class BagelTextModel(nn.Module):
    def __init__(self, config: BagelTextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([BagelDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = BagelRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds, position_ids, mask, past_key_values=None):
        cfg = self.config
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, inputs_embeds.dtype)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, mask, past_key_values=past_key_values)
        return self.norm(hidden)


class BagelModel(BagelPreTrainedModel):
    """Backbone: `visual` + `language_model`; returns the final-norm hidden states."""

    def __init__(self, config: BagelConfig):
        super().__init__(config)
        self.visual = BagelVisual(config)
        self.language_model = BagelTextModel(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.embed_tokens = value

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """One `(h * w, H)` tensor per image."""
        feats = self.visual(pixel_values.to(self.visual.connector.fc1.weight.dtype), image_grid_thw)
        return list(feats.split(image_grid_thw.prod(-1).tolist()))

    def image_mask(self, input_ids, mm_token_type_ids=None) -> torch.Tensor:
        """Which tokens are image (patch) tokens: the processor's `mm_token_type_ids == 1` when given (so that an
        `<|image_pad|>` sampled in a completion stays text), else the `<|image_pad|>` id."""
        if mm_token_type_ids is not None:
            return mm_token_type_ids == 1
        return input_ids == self.config.image_token_id

    def layout(self, input_ids, image_mask, attention_mask):
        """Image blocks and RoPE positions for a full `(B, L)` sequence under the configured convention."""
        cfg = self.config
        blocks = image_blocks(input_ids, image_mask, cfg.vision_start_token_id, cfg.vision_end_token_id)
        return blocks, bagel_position_ids(blocks, attention_mask, shared=cfg.image_rope == "shared")

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.LongTensor | None = None,
        image_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`image_mask` `(B, L)` marks image-token positions explicitly (the teacher adapter's slots); with
        `inputs_embeds`, image rows are expected already in place unless `pixel_values` is given."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if input_ids is None:  # block boundaries then come from image_mask runs alone
            input_ids = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=inputs_embeds.device)
        if image_mask is None:
            image_mask = self.image_mask(input_ids, mm_token_type_ids)
        image_mask = image_mask.bool()
        if pixel_values is not None:
            feats = torch.cat(self.get_image_features(pixel_values, image_grid_thw))
            if feats.shape[0] != int(image_mask.sum()):
                raise ValueError(f"{feats.shape[0]} image features for {int(image_mask.sum())} image tokens.")
            inputs_embeds = inputs_embeds.masked_scatter(image_mask[..., None], feats.to(inputs_embeds.dtype))
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config.get_text_config())
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        blocks, positions = self.layout(input_ids, image_mask, None if attention_mask is None else attention_mask[:, past:])
        if position_ids is None:
            if past:
                raise ValueError("BAGEL positions are not the cache length: pass position_ids with a KV cache "
                                 "(generate() computes them).")
            position_ids = positions
        bidirectional = self.config.image_attention == "bidirectional"
        chunk = self.config.text_config.query_chunk_size
        if chunk and blocks.shape[1] > chunk:  # memory linear in the length (docs/models.md)
            mask = LazyBagelMask(blocks, attention_mask, past, bidirectional=bidirectional)
        else:
            mask = bagel_attention_mask(blocks, attention_mask, past, bidirectional=bidirectional)
        hidden = self.language_model(inputs_embeds, position_ids, mask, past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=past_key_values if use_cache else None)


class BagelForConditionalGeneration(BagelPreTrainedModel, GenerationMixin):
    """BAGEL understanding path + LM head: text generation through the understanding expert."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: BagelConfig):
        super().__init__(config)
        self.model = BagelModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, pixel_values=pixel_values,
            image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids, use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      mm_token_type_ids=None, **kwargs):
        """Positions for the whole sequence so far (stateless, so any cache reordering stays right), sliced to the
        new tokens by the parent; the image map is the prompt's, generated tokens are text."""
        if mm_token_type_ids is not None and mm_token_type_ids.shape[1] < input_ids.shape[1]:
            mm_token_type_ids = F.pad(mm_token_type_ids, (0, input_ids.shape[1] - mm_token_type_ids.shape[1]))
        # Under synced_gpus (multi-process ZeRO-3) a rank that has finished keeps stepping so that every rank runs
        # the same forwards: its mask and token types grow with the cache while its ids stop (outputs discarded).
        n = input_ids.shape[1]
        image_mask = self.model.image_mask(input_ids, None if mm_token_type_ids is None else mm_token_type_ids[:, :n])
        _, positions = self.model.layout(input_ids, image_mask, None if attention_mask is None else attention_mask[:, :n])
        kwargs.pop("position_ids", None)
        inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask, position_ids=positions, **kwargs
        )
        if mm_token_type_ids is not None:  # the parent slices position_ids to the new tokens, not this
            inputs["mm_token_type_ids"] = mm_token_type_ids[:, -inputs["position_ids"].shape[1]:]
        return inputs

