"""Configs of the BAGEL understanding path: the Qwen2 understanding expert (with qk-norm), the SigLIP-NaViT
vision tower, and the wrapper that ties them with the connector and BAGEL's image-block conventions.

Defaults are those of BAGEL-7B-MoT / ThinkMorph-7B (Qwen2.5-7B LLM, SigLIP so400m/14 with 26 layers, 70 patches
per side); tests build tiny configs in code (`opsd_trl.testing.tiny_bagel`).
"""

from __future__ import annotations

from transformers import PreTrainedConfig


class BagelTextConfig(PreTrainedConfig):
    """The language model BAGEL's understanding expert runs: Qwen2 with RMS qk-norm over each head."""

    model_type = "bagel_text"
    base_config_key = "text_config"

    def __init__(
        self,
        vocab_size: int = 152064,
        hidden_size: int = 3584,
        intermediate_size: int = 18944,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 28,
        num_key_value_heads: int = 4,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1000000.0,
        qk_norm: bool = True,
        query_chunk_size: int | None = None,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.qk_norm = qk_norm
        # (Not `attention_chunk_size`: transformers' caches read that name as chunked *local* attention.)
        # Queries per attention call on sequences longer than this (None: one call with the dense (L, L) mask).
        # Chunks keep the mask and scores at (chunk, L): memory linear in L, same result (docs/models.md).
        self.query_chunk_size = query_chunk_size
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class BagelVisionConfig(PreTrainedConfig):
    """SigLIP NaViT tower as BAGEL uses it for understanding: a linear patch embedding over (p, p, c) patches,
    learned absolute position embeddings indexed by the flattened 2D patch position, no ViT 2D-RoPE, no pooling
    head. `spatial_merge_size` is 1 (one LLM token per patch) and only exists so code written for Qwen-VL token
    geometry (tokens = h * w / merge**2) reads BAGEL right."""

    model_type = "bagel_vision"
    base_config_key = "vision_config"

    def __init__(
        self,
        hidden_size: int = 1152,
        intermediate_size: int = 4304,
        num_hidden_layers: int = 26,
        num_attention_heads: int = 16,
        num_channels: int = 3,
        image_size: int = 980,
        patch_size: int = 14,
        hidden_act: str = "gelu_pytorch_tanh",
        layer_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.spatial_merge_size = 1
        kwargs.pop("spatial_merge_size", None)
        super().__init__(**kwargs)


class BagelConfig(PreTrainedConfig):
    """BAGEL understanding path.

    `image_rope` / `image_attention` select the convention for image tokens: BAGEL's own (`"shared"`: every token
    of an image block, `<|vision_start|>` and `<|vision_end|>` included, takes one RoPE position and the text after
    it continues at +1; `"bidirectional"`: full attention inside the block) or vLLM's
    `BagelForConditionalGeneration` (`"sequential"`, `"causal"`). Only the BAGEL convention reproduces the
    checkpoint; the other exists to measure the difference (docs/models.md).
    """

    model_type = "bagel"
    sub_configs = {"text_config": BagelTextConfig, "vision_config": BagelVisionConfig}

    def __init__(
        self,
        text_config: dict | BagelTextConfig | None = None,
        vision_config: dict | BagelVisionConfig | None = None,
        vit_max_num_patch_per_side: int = 70,
        connector_act: str = "gelu_pytorch_tanh",
        interpolate_pos: bool = False,
        image_token_id: int = 151655,
        vision_start_token_id: int = 151652,
        vision_end_token_id: int = 151653,
        image_rope: str = "shared",
        image_attention: str = "bidirectional",
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        if isinstance(text_config, dict) or text_config is None:
            text_config = BagelTextConfig(**(text_config or {}))
        if isinstance(vision_config, dict) or vision_config is None:
            vision_config = BagelVisionConfig(**(vision_config or {}))
        if image_rope not in ("shared", "sequential") or image_attention not in ("bidirectional", "causal"):
            raise ValueError(f"unknown image convention: image_rope={image_rope!r}, image_attention={image_attention!r}")
        self.text_config = text_config
        self.vision_config = vision_config
        self.vit_max_num_patch_per_side = vit_max_num_patch_per_side
        self.connector_act = connector_act
        self.interpolate_pos = interpolate_pos
        self.image_token_id = image_token_id
        self.vision_start_token_id = vision_start_token_id
        self.vision_end_token_id = vision_end_token_id
        self.image_rope = image_rope
        self.image_attention = image_attention
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
