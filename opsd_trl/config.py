"""`VisualOPSDConfig`: TRL's `DistillationConfig` plus the Visual-OPSD fields, with the paper's defaults."""

from dataclasses import dataclass, field

from trl import DistillationConfig

from .markers import IMAGE_SKIP_MARKER

TEACHER_INTRO = (
    "The following images are privileged visual references that depict the intermediate visual thoughts on the path "
    "to the correct answer. Use them silently as grounding context; do not describe or echo them."
)
TEACHER_TRANSITION = "Now, using your own independent reasoning, answer the problem above. Think step by step."

_CHOICES = {
    "loss_type": ("gjsd", "sampled_reverse_kl"),
    "teacher_mode": ("self", "ema", "fixed"),
    "vt_source": ("cache", "online"),
    "on_missing_vt": ("error", "no_vt_teacher"),
    "noise_vt_space": ("pixels", "embeddings"),
    "jsd_clip_form": ("reference", "nonnegative"),
    "loss_normalization": ("tokens", "samples"),
}


@dataclass
class VisualOPSDConfig(DistillationConfig):
    """Configuration for [`~opsd_trl.VisualOPSDTrainer`].

    Inherits every field of `trl.DistillationConfig` (generation, vLLM, logging, `beta`, `temperature`, ...). The
    sampling `temperature` is also the loss temperature tau (the loss is multiplied by tau^2), as in TRL.
    `top_k` stays TRL's *sampling* top-k; the teacher's top-K support of the loss is `teacher_top_k`.
    """

    _VALID_DICT_FIELDS = DistillationConfig._VALID_DICT_FIELDS + ["vllm_llm_kwargs"]

    beta: float = field(
        default=0.5,
        metadata={"help": "Generalized JSD interpolation: 0 = KL(teacher||student), 1 = KL(student||teacher)."},
    )
    loss_type: str = field(default="gjsd", metadata={"help": "gjsd | sampled_reverse_kl."})
    teacher_top_k: int | None = field(
        default=256, metadata={"help": "Keep the teacher's top-K vocabulary entries per position (None = full vocab)."}
    )
    jsd_clip: float | None = field(
        default=0.05, metadata={"help": "Clamp each (token, vocab entry) divergence term to at most this value."}
    )
    jsd_clip_form: str = field(
        default="reference",
        metadata={"help": "Which per-entry terms jsd_clip clamps: reference (p log(p/q), as the reference code; can be "
                  "negative at beta 0 / 1) | nonnegative (p log(p/q) - p + q). Same loss for 0 < beta < 1 or "
                  "without a clip."},
    )
    loss_normalization: str = field(
        default="tokens",
        metadata={"help": "tokens (TRL: sum over the completion tokens of the accumulation window / their count; long "
                  "completions weigh more) | samples (the reference: mean over each completion, then mean over "
                  "the samples of the window; every sample weighs the same)."},
    )
    close_truncated_completions: bool = field(
        default=True,
        metadata={"help": "A completion cut at max_completion_length keeps its first max_completion_length - 1 "
                  "sampled tokens and ends with image_skip_token (<|im_end|>), scored like a sampled EOS (the "
                  "reference). False: the cut completion is scored as sampled, with no EOS position."},
    )
    fused_loss: bool = field(
        default=True,
        metadata={"help": "Compute the loss from hidden states and the lm_head tile by tile (no full logits)."},
    )
    loss_chunk_size: int = field(default=256, metadata={"help": "Completion tokens per loss chunk."})
    teacher_mode: str = field(
        default="ema", metadata={"help": "self (live weights) | ema (shadow weights) | fixed (initial weights)."}
    )
    ema_decay: float = field(default=0.995, metadata={"help": "EMA teacher: shadow = d * shadow + (1 - d) * policy."})
    max_vt_images: int = field(
        default=8, metadata={"help": "Visual thoughts per sample in the teacher context; extra ones are dropped."}
    )
    teacher_intro: str = field(default=TEACHER_INTRO, metadata={"help": "Text before the visual thoughts."})
    teacher_transition: str = field(default=TEACHER_TRANSITION, metadata={"help": "Text after the visual thoughts."})
    vt_source: str | None = field(
        default=None,
        metadata={"help": "cache (read `vt_cache_dir`) | online (encode VT images every step); default: cache when "
                  "vt_cache_dir is set, else online."},
    )
    vt_cache_dir: str | None = field(default=None, metadata={"help": "VT cache folder (vt_source=cache)."})
    allow_trainable_vision_with_cache: bool = field(
        default=False,
        metadata={"help": "Accept a VT cache while the vision tower trains (the cache then goes stale)."},
    )
    noise_vt: bool = field(
        default=False,
        metadata={"help": "Control run: the teacher's VTs carry no information (see noise_vt_space)."},
    )
    noise_vt_space: str = field(
        default="pixels",
        metadata={"help": "pixels (the paper's control): each VT's pixel tensor becomes standard Gaussian noise of its "
                  "shape, encoded by the vision tower, fresh every step | embeddings: VT features become Gaussian "
                  "noise with each image's mean and std (not the paper's). Text LMs: embedding VTs always get "
                  "embedding noise; text VTs (`vt_text`) become random vocabulary tokens, about as many as they had."},
    )
    image_skip_marker: str = field(
        default=IMAGE_SKIP_MARKER,
        metadata={"help": "A round ending on EOS whose text contains this marker gets one more round."},
    )
    image_skip_token: str = field(
        default="<|im_end|>",
        metadata={"help": "Token that closes a turn: closes an image-skip round before the next one opens, and a "
                  "truncated completion (close_truncated_completions)."},
    )
    max_image_skips: int = field(default=1, metadata={"help": "Continuation rounds allowed per completion."})
    on_missing_vt: str = field(
        default="error",
        metadata={"help": "error | no_vt_teacher (the teacher sees intro + transition without images)."},
    )
    vllm_llm_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Extra `vllm.LLM` options for colocate mode (e.g. {\"dtype\": \"float32\"} on CPU)."},
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Longest student prompt in tokens; a longer one raises naming the sample."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.vt_source is None:
            self.vt_source = "cache" if self.vt_cache_dir else "online"
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}.")
        if self.teacher_top_k is not None and self.teacher_top_k < 1:
            raise ValueError(f"teacher_top_k must be >= 1 or None, got {self.teacher_top_k}.")
        if self.jsd_clip is not None and self.jsd_clip <= 0:
            raise ValueError(f"jsd_clip must be > 0 or None, got {self.jsd_clip}.")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        for name in ("max_vt_images", "loss_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_image_skips < 0:
            raise ValueError(f"max_image_skips must be >= 0, got {self.max_image_skips}.")
        if self.vt_source == "cache" and not self.vt_cache_dir:
            raise ValueError("vt_source='cache' needs vt_cache_dir (build one with `opsd-trl build-vt-cache`).")
