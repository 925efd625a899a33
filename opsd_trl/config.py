"""`VisualOPSDConfig`: TRL's `DistillationConfig` plus the Visual-OPSD fields, with the paper's defaults."""

import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Literal

from trl import DistillationConfig

from .losses import ClipForm, Normalization
from .markers import IMAGE_SKIP_MARKER

TEACHER_INTRO = (
    "The following images are privileged visual references that depict the intermediate visual thoughts on the path "
    "to the correct answer. Use them silently as grounding context; do not describe or echo them."
)
TEACHER_TRANSITION = "Now, using your own independent reasoning, answer the problem above. Think step by step."
# The reference's system prompt (`VLM_THINK_SYSTEM_PROMPT`, data/opsd_pack_builder.py), in student and teacher
# contexts; the paper recipes set it as `system_prompt`.
VLM_THINK_SYSTEM_PROMPT = (
    "Let's think step by step to answer the question. For text-based thinking, enclose the process within <think> "
    "</think>, e.g. <think> thinking process here </think>. For visual thinking, enclose the content within "
    "<image_start> </image_end>, e.g. <image_start> thinking image here </image_end>. Finally conclude with the "
    "final answer wrapped in <answer></answer> tags, i.e. <answer> answer here </answer>."
)

# The choice fields' types: `HfArgumentParser` shows them as `choices` in `--help` and refuses other values on the
# command line; `__post_init__` checks values given in Python or in a recipe against the same types.
GJSD, SAMPLED_REVERSE_KL = "gjsd", "sampled_reverse_kl"  # the `loss_type` values, named here only
LossType = Literal[GJSD, SAMPLED_REVERSE_KL]
TeacherMode = Literal["self", "ema", "fixed"]
VTSource = Literal["cache", "online"]
NoiseVTSpace = Literal["pixels", "embeddings"]
OnMissingVT = Literal["error", "no_vt_teacher"]
TeacherTextLayout = Literal["one_turn", "blocks"]


def _choices(annotation) -> tuple | None:
    """The allowed values of a `Literal[...]` (or `Literal[...] | None`) field type; None for other types."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return None


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    """A finite int or float (nan and inf are refused: they pass every comparison check or none)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _in(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """A check: a finite number in the interval (open at the ends asked for)."""
    return lambda v: _number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)


# field: (check of the value, what it must be). Choice fields are checked from their `Literal` type instead.
_FIELD_CHECKS = {
    "teacher_top_k": (lambda v: v is None or (_int(v) and v >= 1), "an integer >= 1 or None"),
    "jsd_clip": (lambda v: v is None or (_number(v) and v > 0), "a finite number > 0 or None"),
    "close_truncated_completions": (lambda v: isinstance(v, bool), "a bool"),
    "fused_loss": (lambda v: isinstance(v, bool), "a bool"),
    "loss_chunk_size": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "num_loss_tokens_to_skip": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "beta": (_in(0.0, 1.0), "in [0.0, 1.0] (a finite number)"),  # TRL's own check lets nan through
    "ema_decay": (_in(0.0, 1.0), "in [0, 1]"),
    "max_vt_images": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "teacher_intro": (lambda v: isinstance(v, str), "a string"),
    "teacher_transition": (lambda v: isinstance(v, str), "a string"),
    "system_prompt": (lambda v: v is None or isinstance(v, str), "a string or None"),
    "ema_init_weights": (lambda v: v is None or (isinstance(v, str) and v != ""), "a path, 'auto' or None"),
    "teacher_prompt_template": (lambda v: isinstance(v, str) and "{prompt}" in v and "{privileged_context}" in v,
                                "a string with both {prompt} and {privileged_context} placeholders"),
    "vt_cache_dir": (lambda v: v is None or isinstance(v, str), "a folder or None"),
    "allow_trainable_vision_with_cache": (lambda v: isinstance(v, bool), "a bool"),
    "reuse_problem_image_features": (lambda v: isinstance(v, bool), "a bool"),
    "noise_vt": (lambda v: isinstance(v, bool), "a bool"),
    "noise_vt_count": (lambda v: v is None or (_int(v) and v >= 1), "an integer >= 1 or None"),
    "image_skip_marker": (lambda v: v is None or isinstance(v, str), "a string or None (None or '': no rounds)"),
    "image_skip_token": (lambda v: isinstance(v, str) and v != "", "a non-empty string (one token)"),
    "max_image_skips": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "vllm_llm_kwargs": (lambda v: v is None or isinstance(v, dict), "a dict (JSON object) or None"),
    "max_prompt_length": (lambda v: v is None or (_int(v) and v >= 1), "an integer >= 1 or None"),
}

_INF = math.inf
# The number fields inherited from TRL's `DistillationConfig` / transformers' `TrainingArguments`: neither refuses
# nan or inf, which then pass their comparisons (nan) and fail deep inside a step, or switch a feature off silently
# (`max_grad_norm` nan: no clipping).
_INHERITED_CHECKS = {
    "learning_rate": (_in(0.0, _INF, high_open=True), "a finite number >= 0"),
    "weight_decay": (_in(0.0, _INF, high_open=True), "a finite number >= 0"),
    "adam_beta1": (_in(0.0, 1.0, high_open=True), "in [0, 1)"),
    "adam_beta2": (_in(0.0, 1.0, high_open=True), "in [0, 1)"),
    "adam_epsilon": (_in(0.0, _INF, high_open=True), "a finite number >= 0"),
    "max_grad_norm": (lambda v: v is None or _in(0.0, _INF, high_open=True)(v),
                      "a finite number >= 0 (0 or None: no clipping)"),
    "num_train_epochs": (_in(0.0, _INF, high_open=True), "a finite number >= 0"),
    "warmup_steps": (_in(0.0, _INF, high_open=True), "a finite number >= 0 (below 1: a share of the steps)"),
    "label_smoothing_factor": (_in(0.0, 1.0, high_open=True), "in [0, 1)"),
    "neftune_noise_alpha": (lambda v: v is None or _in(0.0, _INF, high_open=True)(v), "a finite number >= 0 or None"),
    "logging_steps": (_in(0.0, _INF, high_open=True), "a finite number >= 0"),
    "save_steps": (_in(0.0, _INF, high_open=True), "a finite number >= 0"),
    "eval_steps": (lambda v: v is None or _in(0.0, _INF, high_open=True)(v), "a finite number >= 0 or None"),
    "eval_delay": (_in(0.0, _INF, high_open=True), "a finite number >= 0"),
    "temperature": (_in(0.0, _INF, low_open=True, high_open=True), "a finite number > 0"),
    "top_p": (_in(0.0, 1.0, low_open=True), "in (0, 1]"),
    "top_k": (lambda v: v is None or (_int(v) and v >= 0), "an integer >= 0 or None"),
    "min_p": (lambda v: v is None or _in(0.0, 1.0)(v), "in [0, 1] or None"),
    "repetition_penalty": (_in(0.0, _INF, low_open=True, high_open=True), "a finite number > 0"),
    "vllm_server_timeout": (_in(0.0, _INF, low_open=True, high_open=True), "a finite number > 0"),
    "vllm_gpu_memory_utilization": (_in(0.0, 1.0, low_open=True), "in (0, 1]"),
}


@dataclass
class VisualOPSDConfig(DistillationConfig):
    r"""
    Configuration class for [`~opsd_trl.VisualOPSDTrainer`].

    Extends TRL's [`~trl.DistillationConfig`] (generation, vLLM, logging, `temperature`, ...) with the Visual-OPSD
    fields, at the paper's defaults. The sampling `temperature` is also the loss temperature tau (the loss is
    multiplied by tau^2), as in TRL. `top_k` stays TRL's *sampling* top-k; the teacher's top-K support of the loss is
    `teacher_top_k`. Every field is checked on construction (a bad value raises, naming the field), and a warning
    names the options that another setting makes ineffective (e.g. `beta` with `loss_type="sampled_reverse_kl"`).

    Parameters:
        > Parameters that control the loss

        beta (`float`, *optional*, defaults to `0.5`):
            Generalized JSD interpolation: `0.0` = KL(teacher||student), `1.0` = KL(student||teacher), between: the
            generalized JSD with mixture M = beta T + (1 - beta) S.
        loss_type (`str`, *optional*, defaults to `"gjsd"`):
            `"gjsd"` (the paper's clipped top-K generalized JSD) or `"sampled_reverse_kl"` (policy gradient on the
            sampled token with advantage log p_T - log p_S; `beta`, `teacher_top_k`, `jsd_clip`, `jsd_clip_form` and
            `fused_loss` do not apply to it).
        teacher_top_k (`int` or `None`, *optional*, defaults to `256`):
            Keep the teacher's top-K vocabulary entries per position; both distributions are renormalised on them.
            `None` = the full vocabulary.
        jsd_clip (`float` or `None`, *optional*, defaults to `0.05`):
            Clamp each (token, vocabulary entry) divergence term to at most this value. `None` = no clip.
        jsd_clip_form (`str`, *optional*, defaults to `"reference"`):
            Which per-entry terms `jsd_clip` clamps: `"reference"` (p log(p/q), as the reference code; can be negative
            at beta 0 / 1) or `"nonnegative"` (p log(p/q) - p + q). The same loss for 0 < beta < 1 or without a clip.
        loss_normalization (`str`, *optional*, defaults to `"tokens"`):
            `"tokens"` (TRL: sum over the completion tokens of the accumulation window / their count; long
            completions weigh more) or `"samples"` (the reference: mean over each completion, then over the samples
            of the window; every sample weighs the same).
        close_truncated_completions (`bool`, *optional*, defaults to `True`):
            A completion cut at `max_completion_length` keeps its first `max_completion_length - 1` sampled tokens
            and ends with `image_skip_token`, scored like a sampled EOS (the reference). `False`: the cut completion
            is scored as sampled, with no EOS position. Only `loss_type="sampled_reverse_kl"` reads that token: under
            `"gjsd"` both settings train identically.
        fused_loss (`bool`, *optional*, defaults to `True`):
            Compute the loss from hidden states and the lm_head tile by tile (no full logits); heads with a bias,
            scale or softcap fall back to logits.
        loss_chunk_size (`int`, *optional*, defaults to `256`):
            Completion tokens per loss chunk (peak memory of the loss).
        num_loss_tokens_to_skip (`int`, *optional*, defaults to `0`):
            Leave the first this many completion tokens of each completion out of the loss (and out of the window's
            token / sample count), as TRL SDFTTrainer's option of the same name; they still condition the rest.

        > Parameters that control the teacher

        teacher_mode (`str`, *optional*, defaults to `"ema"`):
            The teacher's weights: `"self"` (the live weights), `"ema"` (shadow weights updated after every optimizer
            step) or `"fixed"` (the initial weights: the base model under LoRA, else a frozen copy).
        ema_decay (`float`, *optional*, defaults to `0.995`):
            EMA teacher: shadow = d * shadow + (1 - d) * policy. Only with `teacher_mode="ema"`.
        ema_init_weights (`str` or `None`, *optional*):
            The EMA teacher's starting weights. `None`: the policy's. A `.safetensors` file (the model's parameter
            names) or a BAGEL / ThinkMorph release folder (its `ema.safetensors`); `"auto"`: the policy's release
            folder's `ema.safetensors` when it has one (the reference), else the policy's weights.

        > Parameters that control the teacher context (visual thoughts)

        max_vt_images (`int`, *optional*, defaults to `8`):
            Visual thoughts (VTs) per sample in the teacher context; extra ones are dropped and counted.
        teacher_intro (`str`, *optional*, defaults to the paper's text):
            Text before the visual thoughts, at the end of the last user turn.
        teacher_transition (`str`, *optional*, defaults to the paper's text):
            Text after the visual thoughts.
        teacher_text_layout (`str`, *optional*, defaults to `"one_turn"`):
            `"one_turn"`: intro, VTs and transition appended to the last user turn; `"blocks"` (the reference): the
            intro, the VTs and the transition each in a user message of its own, so a chat template renders each text
            in its own `<|im_start|>...<|im_end|>` block. BAGEL's template renders both the same way.
        system_prompt (`str` or `None`, *optional*):
            A system message put first in the student and the teacher contexts of every sample (the reference:
            `VLM_THINK_SYSTEM_PROMPT`). `None`: the dataset's prompt as given (Qwen2.5-VL's chat template then inserts
            "You are a helpful assistant.").
        teacher_prompt_template (`str`, *optional*, defaults to `"{prompt}\n\n{privileged_context}"`):
            For a sample with a `privileged_context` (TRL SDFTTrainer's dataset contract): the teacher's last user
            turn text, filled with that turn's text and the privileged text (SDFT's `teacher_prompt_template`, same
            default). Samples without one are unaffected.
        vt_source (`str` or `None`, *optional*):
            `"cache"` (read `vt_cache_dir`) or `"online"` (encode the VT images every step). Default: `"cache"` when
            `vt_cache_dir` is set, else `"online"`.
        vt_cache_dir (`str` or `None`, *optional*):
            VT cache folder (built by `opsd-trl build-vt-cache`), read with `vt_source="cache"`.
        allow_trainable_vision_with_cache (`bool`, *optional*, defaults to `False`):
            Accept a VT cache while the vision tower trains (the cache then goes stale).
        on_missing_vt (`str`, *optional*, defaults to `"error"`):
            A sample without visual thoughts: `"error"` (raise, naming it) or `"no_vt_teacher"` (the teacher sees
            intro + transition without images).
        reuse_problem_image_features (`bool`, *optional*, defaults to `True`):
            With a frozen vision tower, encode each problem image once per step for the teacher and the student
            forward, or read its features from the VT cache when the cache holds them (built with problem columns).
            `False`: each forward runs the tower (as with a trainable tower).
        noise_vt (`bool`, *optional*, defaults to `False`):
            Control run: the teacher's VTs carry no information (see `noise_vt_space`).
        noise_vt_space (`str`, *optional*, defaults to `"pixels"`):
            `"pixels"` (the paper's control): each VT's pixel tensor becomes standard Gaussian noise of its shape,
            encoded by the vision tower, fresh every step; `"embeddings"`: VT features become Gaussian noise with
            each image's mean and std (not the paper's). Text LMs: embedding VTs always get embedding noise; text VTs
            (`vt_text`) become random vocabulary tokens, about as many as they had. Only with `noise_vt=True`.
        noise_vt_count (`int` or `None`, *optional*, defaults to `None`):
            `None` (the paper's control): as many noise VTs as the sample has VTs. An integer: every sample's
            noised teacher sees exactly this many (its VTs cycled to the count, then noised; text VTs: this many
            random tokens), so the VT count, which can give the answer away (a maze's path length), carries
            nothing. Only with `noise_vt=True`.

        > Parameters that control generation

        image_skip_marker (`str` or `None`, *optional*, defaults to `"<image_start>"`):
            A round ending on EOS whose text contains this marker gets one more round. `None` or `""` = no image-skip
            rounds.
        image_skip_token (`str`, *optional*, defaults to `"<|im_end|>"`):
            Token that closes a turn: closes an image-skip round before the next one opens, and a truncated
            completion (`close_truncated_completions`).
        max_image_skips (`int`, *optional*, defaults to `1`):
            Continuation rounds allowed per completion; `0` = no image-skip rounds.
        vllm_llm_kwargs (`dict` or `None`, *optional*):
            Extra `vllm.LLM` options for `vllm_mode="colocate"` (e.g. `{"dtype": "float32"}` on CPU).

        > Parameters that control the data preprocessing

        max_prompt_length (`int` or `None`, *optional*):
            Longest student prompt in tokens; a longer one raises, naming the sample. `None` = no limit.
    """

    _VALID_DICT_FIELDS = DistillationConfig._VALID_DICT_FIELDS + ["vllm_llm_kwargs"]

    # Parameters that control the loss
    beta: float = field(
        default=0.5,
        metadata={"help": "Generalized JSD interpolation: 0 = KL(teacher||student), 1 = KL(student||teacher)."},
    )
    loss_type: LossType = field(
        default=GJSD,
        metadata={"help": "gjsd (clipped top-K generalized JSD) | sampled_reverse_kl (policy gradient on the sampled "
                  "token; ignores beta, teacher_top_k, jsd_clip, jsd_clip_form, fused_loss)."},
    )
    teacher_top_k: int | None = field(
        default=256, metadata={"help": "Keep the teacher's top-K vocabulary entries per position (None = full vocab)."}
    )
    jsd_clip: float | None = field(
        default=0.05, metadata={"help": "Clamp each (token, vocab entry) divergence term to at most this value."}
    )
    jsd_clip_form: ClipForm = field(
        default="reference",
        metadata={"help": "Which per-entry terms jsd_clip clamps: reference (p log(p/q), as the reference code; can be "
                  "negative at beta 0 / 1) | nonnegative (p log(p/q) - p + q). Same loss for 0 < beta < 1 or "
                  "without a clip."},
    )
    loss_normalization: Normalization = field(
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
    num_loss_tokens_to_skip: int = field(
        default=0,
        metadata={"help": "Leave the first N completion tokens out of the loss and its token count (SDFT's option)."},
    )

    # Parameters that control the teacher
    teacher_mode: TeacherMode = field(
        default="ema", metadata={"help": "self (live weights) | ema (shadow weights) | fixed (initial weights)."}
    )
    ema_decay: float = field(default=0.995, metadata={"help": "EMA teacher: shadow = d * shadow + (1 - d) * policy."})
    ema_init_weights: str | None = field(
        default=None,
        metadata={"help": "EMA teacher's starting weights: None (the policy's) | a .safetensors file | a BAGEL release "
                  "folder (its ema.safetensors) | auto (the policy folder's ema.safetensors when present: the "
                  "reference)."},
    )

    # Parameters that control the teacher context (visual thoughts)
    max_vt_images: int = field(
        default=8, metadata={"help": "Visual thoughts per sample in the teacher context; extra ones are dropped."}
    )
    teacher_intro: str = field(default=TEACHER_INTRO, metadata={"help": "Text before the visual thoughts."})
    teacher_transition: str = field(default=TEACHER_TRANSITION, metadata={"help": "Text after the visual thoughts."})
    teacher_text_layout: TeacherTextLayout = field(
        default="one_turn",
        metadata={"help": "one_turn (intro, VTs, transition in the last user turn) | blocks (the reference: each in a "
                  "user message of its own, one <|im_start|>...<|im_end|> block per text)."},
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "System message put first in the student and teacher contexts (the reference: its "
                  "think/image/answer prompt). None: the dataset's prompt as given."},
    )
    teacher_prompt_template: str = field(
        default="{prompt}\n\n{privileged_context}",
        metadata={"help": "A sample with a privileged_context (SDFT's dataset contract): the teacher's last user turn, "
                  "from that turn's text ({prompt}) and the privileged text ({privileged_context}); SDFT's default."},
    )
    vt_source: VTSource | None = field(
        default=None,
        metadata={"help": "cache (read `vt_cache_dir`) | online (encode VT images every step); default: cache when "
                  "vt_cache_dir is set, else online."},
    )
    vt_cache_dir: str | None = field(default=None, metadata={"help": "VT cache folder (vt_source=cache)."})
    allow_trainable_vision_with_cache: bool = field(
        default=False,
        metadata={"help": "Accept a VT cache while the vision tower trains (the cache then goes stale)."},
    )
    on_missing_vt: OnMissingVT = field(
        default="error",
        metadata={"help": "error | no_vt_teacher (the teacher sees intro + transition without images)."},
    )
    reuse_problem_image_features: bool = field(
        default=True,
        metadata={"help": "With a frozen vision tower, encode each problem image once per step for the teacher and "
                  "the student forward, or read it from the VT cache when the cache holds it (built with "
                  "problem columns). False: each forward runs the tower (as with a trainable tower)."},
    )
    noise_vt: bool = field(
        default=False,
        metadata={"help": "Control run: the teacher's VTs carry no information (see noise_vt_space)."},
    )
    noise_vt_space: NoiseVTSpace = field(
        default="pixels",
        metadata={"help": "pixels (the paper's control): each VT's pixel tensor becomes standard Gaussian noise of its "
                  "shape, encoded by the vision tower, fresh every step | embeddings: VT features become Gaussian "
                  "noise with each image's mean and std (not the paper's). Text LMs: embedding VTs always get "
                  "embedding noise; text VTs (`vt_text`) become random vocabulary tokens, about as many as they had."},
    )
    noise_vt_count: int | None = field(
        default=None,
        metadata={"help": "None (the paper's control): as many noise VTs as the sample has VTs | an integer: every "
                  "sample's noised teacher sees exactly this many (its VTs cycled to the count), so the VT count "
                  "carries no information (e.g. a maze's path length)."},
    )

    # Parameters that control generation
    image_skip_marker: str | None = field(
        default=IMAGE_SKIP_MARKER,
        metadata={"help": "A round ending on EOS whose text contains this marker gets one more round."},
    )
    image_skip_token: str = field(
        default="<|im_end|>",
        metadata={"help": "Token that closes a turn: closes an image-skip round before the next one opens, and a "
                  "truncated completion (close_truncated_completions)."},
    )
    max_image_skips: int = field(default=1, metadata={"help": "Continuation rounds allowed per completion."})
    vllm_llm_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Extra `vllm.LLM` options for colocate mode (e.g. {\"dtype\": \"float32\"} on CPU)."},
    )

    # Parameters that control the data preprocessing
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Longest student prompt in tokens; a longer one raises naming the sample."}
    )

    def __post_init__(self):
        # The inherited numbers first: transformers' own handling of some (`int(logging_steps)`, the sign of
        # `warmup_steps`) fails on nan / inf / negative values with messages that name no field or the wrong cause.
        self._check(_INHERITED_CHECKS)
        super().__post_init__()  # TRL's checks (beta in [0, 1], ...); parses vllm_llm_kwargs given as JSON text
        if self.vt_source is None:
            self.vt_source = "cache" if self.vt_cache_dir else "online"
        for name, annotation in VisualOPSDConfig.__annotations__.items():
            value = getattr(self, name)
            choices = _choices(annotation)
            if choices is not None and value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}.")
        self._check(_FIELD_CHECKS)
        if self.vt_source == "cache" and not self.vt_cache_dir:
            raise ValueError("vt_source='cache' needs vt_cache_dir (build one with `opsd-trl build-vt-cache`).")
        self._warn_ignored_options()

    def _check(self, checks: dict) -> None:
        for name, (check, expected) in checks.items():
            value = getattr(self, name)
            if not check(value):
                raise ValueError(f"{name} must be {expected}, got {value!r}.")

    def _ignoring_settings(self) -> list[tuple[str, tuple[str, ...]]]:
        """(a setting of this config, the options it makes ineffective)."""
        found = []
        if self.loss_type == SAMPLED_REVERSE_KL:  # the sampled token's log-ratio, from full-vocabulary logits
            found.append(("loss_type='sampled_reverse_kl'",
                          ("beta", "teacher_top_k", "jsd_clip", "jsd_clip_form", "fused_loss")))
        if self.loss_type == "gjsd":  # the divergence at the closing position does not depend on the token there
            found.append(("loss_type='gjsd'", ("close_truncated_completions",)))
        if self.jsd_clip is None:
            found.append(("jsd_clip=None", ("jsd_clip_form",)))
        if self.teacher_mode != "ema":
            found.append((f"teacher_mode={self.teacher_mode!r}", ("ema_decay", "ema_init_weights")))
        if not self.noise_vt:
            found.append(("noise_vt=False", ("noise_vt_space", "noise_vt_count")))
        if self.vt_source == "online":
            found.append(("vt_source='online'", ("vt_cache_dir", "allow_trainable_vision_with_cache")))
        if self.max_image_skips == 0 and self.image_skip_marker:
            found.append(("max_image_skips=0", ("image_skip_marker",)))
        if not self.image_skip_marker and self.max_image_skips != 0:
            found.append((f"image_skip_marker={self.image_skip_marker!r}", ("max_image_skips",)))
        if not self.use_vllm or self.vllm_mode != "colocate":  # the options of a colocated engine
            found.append(("use_vllm=False" if not self.use_vllm else f"vllm_mode={self.vllm_mode!r}",
                          ("vllm_llm_kwargs",)))
        return found

    def _warn_ignored_options(self) -> None:
        """One warning naming every option set away from its default that another setting makes ineffective."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        reported, lines = set(), []
        for setting, names in self._ignoring_settings():
            ignored = [n for n in names if getattr(self, n) != defaults[n] and n not in reported]
            reported.update(ignored)
            if ignored:
                lines.append(f"{setting} ignores {', '.join(f'{n}={getattr(self, n)!r}' for n in ignored)}")
        if lines:  # Python shows a repeated warning once
            warnings.warn("VisualOPSDConfig: " + "; ".join(lines) + " (these options have no effect).", stacklevel=4)

    def needs_teacher_copy(self, peft: bool) -> bool:
        """Whether the teacher keeps its own copy of the trainable weights: `ema` always (the shadow), `fixed` unless
        the policy is a LoRA adapter (its fixed teacher is the base model, adapter disabled), `self` never."""
        return self.teacher_mode == "ema" or (self.teacher_mode == "fixed" and not peft)
