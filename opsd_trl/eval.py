"""Evaluation: exact-scorer accuracy, output length, generation latency, teacher-vs-student KL, KL-gap closure.

Definitions (docs/metrics.md):
- accuracy: share of samples whose greedy completion the scorer accepts: the row's task's exact scorer, or one chosen
  by name for every row (`opsd_trl.tasks.scorers`: exact match, a multiple-choice letter, a user's module:function);
- mean output tokens: generated tokens per sample, EOS excluded;
- latency: generation wall time per sample (batched greedy decoding, batch size reported);
- KL(T||S): per-token KL from a *fixed reference teacher* (the initial policy with VTs in its context) to the
  evaluated student (no VTs), on the student's own greedy completions, full vocabulary, tau = 1, averaged over all
  completion tokens (EOS included) of all samples;
- KL-gap closure: (KL_before - KL_after) / KL_before, both against the same reference teacher.

The contexts are the trainer's: `opsd_trl.teacher_context` builds the teacher prompt and the model adapter runs
the spliced forward, so eval and training see token-for-token the same sequences.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .config import TEACHER_INTRO, TEACHER_TRANSITION
from .data import decode_sample_images
from .diagnostics import full_vocab_kl
from .generation import HFGenerator, SamplingSettings
from .models.adapters import get_adapter, vision_delimiters
from .models.head import OutputHead
from .models.loading import is_release_folder, load_pretrained
from .tasks.common import load_meta
from .tasks.scorers import Scorer, get_scorer
from .teacher_context import TeacherContext, load_context_words, placeholders_per_image


@dataclass
class Contexts:
    """How to render a sample's student or teacher context for one processing class: the trainer's builder
    (`opsd_trl.teacher_context.TeacherContext`), so eval sees the sequences training sees. `intro` / `transition`
    default to `VisualOPSDConfig`'s; pass the run's own (and its `teacher_text_layout`, `system_prompt`). A text LM
    (a tokenizer) reads `vt_text` as its VTs. `noise_vt` / `noise_vt_count`: the teacher is the noise-VT control's
    (pixel space, as the trainer's default), for diagnostics of what the noised teacher still knows."""

    processor: object
    intro: str = TEACHER_INTRO
    transition: str = TEACHER_TRANSITION
    max_vt_images: int = 8
    chat_template_kwargs: dict | None = None
    layout: str = "one_turn"  # `VisualOPSDConfig.teacher_text_layout`
    system_prompt: str | None = None  # `VisualOPSDConfig.system_prompt`, in both contexts
    noise_vt: bool = False
    noise_vt_count: int | None = None

    @classmethod
    def from_config(cls, processor, args) -> Contexts:
        """The contexts a run's `VisualOPSDConfig` trained with (words, layout, system prompt, VT limit,
        chat-template kwargs)."""
        return cls(processor, intro=args.teacher_intro, transition=args.teacher_transition,
                   max_vt_images=args.max_vt_images, chat_template_kwargs=args.chat_template_kwargs,
                   layout=args.teacher_text_layout, system_prompt=args.system_prompt)

    def __post_init__(self):
        self.builder = TeacherContext(
            self.processor, intro=self.intro, transition=self.transition, uses_images=self.uses_images,
            chat_template_kwargs=self.chat_template_kwargs, max_vt_images=self.max_vt_images, layout=self.layout,
            system_prompt=self.system_prompt, noise_vt=self.noise_vt, noise_vt_count=self.noise_vt_count,
        )

    @property
    def uses_images(self) -> bool:
        return getattr(self.processor, "image_processor", None) is not None

    @property
    def tokenizer(self):
        return self.builder.tokenizer

    def images(self, row: dict, teacher: bool) -> list:
        if not self.uses_images:
            return []
        row = decode_sample_images(row)  # as training decodes them (opsd_trl.images)
        return list(row.get("images") or []) + (self.builder.vt_images(row) if teacher else [])

    def pixels(self, images: list) -> dict:
        return dict(self.processor.image_processor(images=images, return_tensors="pt")) if images else {}

    def prompt_ids(self, row: dict, teacher: bool, grid_thw: torch.Tensor | None = None) -> tuple[list[int],
                                                                                              list[bool]]:
        """Token ids (image placeholders expanded) and the mask of image-feature slots."""
        tokens = placeholders_per_image(self.processor, grid_thw) if grid_thw is not None else []
        row = self.builder.with_system_prompt([row])[0]
        if teacher:
            n_vt = len(self.images(row, True)) - len(self.images(row, False))
            prompt = self.builder.teacher_prompt(row, n_vt, tokens, use_vt_text=True)
        else:
            prompt = self.builder.student_prompt(row, tokens)
        return prompt.input_ids, prompt.slot_mask


def completion_logits(model, contexts: Contexts, rows: list[dict], completions: list[list[int]], teacher: bool,
                      pixels: list[dict] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits `(B, C, V)` predicting each completion token after the student (or teacher) context, and the
    completion mask `(B, C)`. `pixels` (per row, from `Contexts.pixels`) may be precomputed by the caller."""
    adapter = get_adapter(model)
    pad_id = contexts.tokenizer.pad_token_id
    pixels = pixels or [contexts.pixels(contexts.images(r, teacher)) for r in rows]
    if teacher and contexts.noise_vt and contexts.uses_images:
        pixels = [_noise_vt_pixels(r, p) for r, p in zip(rows, pixels, strict=True)]
    prompts = [contexts.prompt_ids(r, teacher, p.get("image_grid_thw")) for r, p in zip(rows, pixels, strict=True)]
    width, c = max(len(ids) for ids, _ in prompts), max(len(x) for x in completions)
    device = next(model.parameters()).device
    ids = torch.full((len(rows), width + c), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    slot = torch.zeros_like(ids, dtype=torch.bool)
    for i, ((p, m), comp) in enumerate(zip(prompts, completions, strict=True)):
        start = width - len(p)  # prompts padded on the left, completions on the right (as in the trainer)
        ids[i, start:width] = torch.tensor(p)
        slot[i, start:width] = torch.tensor(m)
        ids[i, width : width + len(comp)] = torch.tensor(comp, dtype=torch.long)
        attn[i, start : width + len(comp)] = 1
    with_images = [p for p in pixels if p]  # a text LM's contexts have no image slots
    slots = adapter.encode_images(
        model, torch.cat([p["pixel_values"] for p in with_images]).to(device),
        torch.cat([p["image_grid_thw"] for p in with_images]).to(device),
    ) if with_images else []
    hidden = adapter.teacher_hidden_states(model, ids.to(device), attn.to(device), slot.to(device), slots)
    logits = OutputHead.of(model).logits(hidden[:, width - 1 : -1, :])
    return logits, attn[:, width:].bool().to(device)


def _noise_vt_pixels(row: dict, pixels: dict) -> dict:
    """The pixel-space noise-VT control: each VT's pixel rows become standard Gaussian noise (drawn per sample, as
    `TeacherContext.vt_features` draws them); the problem images' rows are kept."""
    n_problem = int(pixels["image_grid_thw"][: len(row.get("images") or [])].prod(-1).sum())
    values = pixels["pixel_values"].clone()
    values[n_problem:] = torch.randn(values.shape[0] - n_problem, values.shape[1])
    return {**pixels, "pixel_values": values}


def kl_gap_closure(kl_before: float, kl_after: float) -> float:
    """Share of the teacher-student KL gap closed by training: (before - after) / before."""
    return (kl_before - kl_after) / kl_before


def vision_token_ids(processor) -> list[int]:
    """Vision placeholder / delimiter ids. A completion must never contain them: fed back into a forward they would
    be read as image slots, so generation suppresses them (an untrained policy samples them otherwise)."""
    vocab = getattr(processor, "tokenizer", processor).get_vocab()
    names = [getattr(processor, "image_token", None), getattr(processor, "video_token", None)]
    names += vision_delimiters()  # the image-block delimiters of the families' adapters
    return sorted({vocab[n] for n in names if n in vocab})


def row_scorers(rows: list[dict], scorer: str | None) -> list[Scorer]:
    """Each row's scorer: `scorer` (a name, `opsd_trl.tasks.scorers.get_scorer`) for all, else the row's `task`."""
    by_name = {}
    out = []
    for row in rows:
        name = scorer or row.get("task")
        if not name:
            raise ValueError(f"sample {row.get('id')!r} has no task to score it by: choose a scorer (evaluate(scorer="
                             "...), opsd-trl eval --scorer exact_match | multiple_choice | module:function).")
        if name not in by_name:
            by_name[name] = get_scorer(name)
        out.append(by_name[name])
    return out


@torch.no_grad()
def evaluate(model, processor, dataset, *, reference=None, teacher_context: bool = False, batch_size: int = 64,
             max_new_tokens: int = 16, contexts: Contexts | None = None, progress: bool = True,
             desc: str = "eval", scorer: str | None = None) -> dict:
    """Greedy-decode every sample and score it; with `reference`, also the KL(T||S) diagnostic.

    `teacher_context=True` evaluates `model` as the teacher (VTs in its context): teacher-with-VT accuracy.
    `scorer` names the scorer of every row (`opsd_trl.tasks.scorers`); None: each row's `task` column.
    Returns {"n", "accuracy", "mean_output_tokens", "latency_s_per_sample", "batch_size"[, "kl_teacher_student"],
    "predictions"}: one record per sample (id, task, meta, completion, parsed answer, correct[, its mean
    KL(T||S) and its token count]), so anyone can re-score the outputs with their own simulator.
    """
    contexts = contexts or Contexts(processor)
    model.eval()
    if reference is not None:
        reference.eval()
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, image_skip_marker=None)
    generator = HFGenerator(model, processor, settings,
                            generation_kwargs={"suppress_tokens": vision_token_ids(processor)})
    eos = generator.eos_token_ids
    n_tokens, gen_time, kls, predictions = 0, 0.0, [], []
    rows_all = list(dataset)
    scorers = row_scorers(rows_all, scorer)  # before any generation: a row without one fails fast
    for start in tqdm(range(0, len(rows_all), batch_size), desc=desc, disable=not progress, leave=False):
        rows = rows_all[start : start + batch_size]
        images = [contexts.images(r, teacher_context) for r in rows]
        pixels = [contexts.pixels(im) for im in images]
        prompts = [contexts.prompt_ids(r, teacher_context, p.get("image_grid_thw"))[0]
                   for r, p in zip(rows, pixels, strict=True)]
        t0 = time.perf_counter()
        completions = generator.generate(prompts, images).completion_ids
        gen_time += time.perf_counter() - t0
        for r, comp, s in zip(rows, completions, scorers[start : start + batch_size], strict=True):
            text = contexts.tokenizer.decode(comp, skip_special_tokens=True)
            predictions.append({"id": r.get("id"), "task": s.name, "meta": load_meta(r["meta"]) if r.get("meta") else None,
                                "completion": text, "parsed": s.parse(text), "correct": bool(s.score(r, text))})
            n_tokens += sum(t not in eos for t in comp)
        if reference is not None:
            completions = [c or [min(eos)] for c in completions]  # an empty completion still scores its EOS
            t_logits, mask = completion_logits(reference, contexts, rows, completions, teacher=True)
            s_logits, _ = completion_logits(model, contexts, rows, completions, teacher=False,
                                            pixels=None if teacher_context else pixels)
            kl = full_vocab_kl(t_logits[mask], s_logits[mask])
            kls.append(kl)
            for record, row_kl in zip(predictions[-len(rows):], kl.split(mask.sum(-1).tolist()), strict=True):
                record.update(kl_teacher_student=row_kl.mean().item(), kl_tokens=len(row_kl))  # over its tokens
    n = len(rows_all)
    out = {
        "n": n,
        "accuracy": sum(p["correct"] for p in predictions) / n,
        "mean_output_tokens": n_tokens / n,
        "latency_s_per_sample": gen_time / n,
        "batch_size": batch_size,
    }
    if kls:
        out["kl_teacher_student"] = torch.cat(kls).mean().item()
    out["predictions"] = predictions
    return out


def write_predictions(metrics: dict, path) -> dict:
    """Move `metrics["predictions"]` to a JSON-lines file at `path` (one sample a line); returns the metrics
    without them."""
    metrics = dict(metrics)
    with open(path, "w") as f:
        for record in metrics.pop("predictions", []):
            f.write(json.dumps(record) + "\n")
    return metrics


def load_checkpoint(path: str):
    """`(model, processing_class)` from a saved model folder of any supported family (`opsd_trl.models.loading`).
    Errors name the path and what to give instead."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"checkpoint {path} not found; give a model folder (the output_dir of opsd-trl train, or a "
            "save_pretrained folder) or a quickstart .safetensors weights file."
        )
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is not a model folder; give the folder (opsd-trl eval also reads a "
                         "quickstart .safetensors weights file: opsd_trl.quickstart.model.load_checkpoint).")
    _check_has_weights(path)
    model, processor = load_pretrained(path, dtype="float32")
    return model.eval(), processor


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _check_has_weights(path: str) -> None:
    """A transformers folder with a config but no weights (a LoRA run's adapter-only folder, a DeepSpeed checkpoint
    saved without gathered weights) would otherwise end in a loader error about missing files."""
    if not os.path.isfile(os.path.join(path, "config.json")) or is_release_folder(path):
        return  # load_pretrained names what a folder without config.json lacks; release folders have their own files
    if not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
        raise ValueError(
            f"checkpoint {path} has a config.json but no model weights ({' / '.join(WEIGHT_FILES[::2])}; it holds "
            f"{sorted(os.listdir(path))[:8]}): a LoRA run saves only its adapter (merge it into the base model and "
            "save_pretrained the result), a DeepSpeed checkpoint without gathered weights needs its zero_to_fp32.py. "
            "Give a folder written by save_pretrained (the output_dir of opsd-trl train)."
        )


def _check_same_vocabulary(loaded: dict) -> None:
    """Every checkpoint of one evaluation shares the tokenizer: the KL compares their distributions token by token."""
    (first, (_, p0)), *rest = loaded.items()
    t0 = getattr(p0, "tokenizer", p0)
    for path, (_, processor) in rest:
        tokenizer = getattr(processor, "tokenizer", processor)
        if tokenizer.get_vocab() != t0.get_vocab():
            raise ValueError(
                f"checkpoints {first} and {path} have different vocabularies ({len(t0)} vs "
                f"{len(tokenizer)} tokens): the model, --baseline and --reference must be the same model "
                "family and tokenizer (checkpoints of one training run)."
            )


def context_settings(paths: list[str | None]) -> dict:
    """The teacher-context settings of an evaluation, as `Contexts` keywords: those saved with the first checkpoint
    that has them (a model folder written by `VisualOPSDTrainer`: `opsd_trl.teacher_context.CONTEXT_FILE`), else the
    trainer's defaults (a quickstart weights file has no folder: `opsd-trl eval` passes the quickstart's words)."""
    for path in paths:
        saved = load_context_words(path) if path and os.path.isdir(path) else None
        if saved:
            return {"intro": saved["teacher_intro"], "transition": saved["teacher_transition"],
                    "max_vt_images": saved["max_vt_images"], "chat_template_kwargs": saved["chat_template_kwargs"],
                    # folders saved before the layout and system prompt were recorded: the defaults
                    "layout": saved.get("teacher_text_layout", "one_turn"), "system_prompt": saved.get("system_prompt")}
    return {"intro": TEACHER_INTRO, "transition": TEACHER_TRANSITION}


def evaluate_checkpoints(model_path: str, dataset, *, reference_path: str | None = None,
                         baseline_path: str | None = None, predictions_dir: str | None = None,
                         intro: str | None = None, transition: str | None = None, load=load_checkpoint,
                         **kwargs) -> dict:
    """Metrics of `model_path` (and of `baseline_path`, then KL-gap closure between them) on `dataset`.

    `load(path) -> (model, processing_class)` reads a checkpoint (default: a model folder, `load_checkpoint`; the
    quickstart passes its weights-file loader). Other keywords go to `evaluate` (e.g. `scorer`).

    `intro` / `transition` surround the VTs in the teacher context: the words the run trained with (the quickstart's
    are `opsd_trl.quickstart.model.TEACHER_INTRO` / `TEACHER_TRANSITION`). None: the words saved with the
    checkpoints (`context_settings`); words the tokenizer cannot write are refused.

    The KL needs visual thoughts and a fixed reference teacher: `reference_path`, else the baseline. Rows without
    VTs (e.g. a VLMEvalKit TSV) get accuracy, tokens and latency only. Per-sample predictions go to
    `predictions_dir/{model,baseline}.predictions.jsonl` when it is given; the returned metrics never hold them.
    """
    reference_path = reference_path or baseline_path
    if len(dataset) == 0:
        raise ValueError("the evaluation dataset is empty: nothing to evaluate (check --n, --split or the TSV).")
    has_vts = any(any(dataset[c]) for c in ("vt_images", "vt_text") if c in dataset.column_names)
    paths = [p for p in (model_path, baseline_path, reference_path if has_vts else None) if p]
    loaded = {p: load(p) for p in dict.fromkeys(paths)}
    _check_same_vocabulary(loaded)
    reference = loaded[reference_path][0] if reference_path and has_vts else None
    settings = context_settings([model_path, baseline_path, reference_path])
    settings.update({k: v for k, v in (("intro", intro), ("transition", transition)) if v is not None})
    results = {}
    for name, path in (("baseline", baseline_path), ("model", model_path)):
        if path:
            model, processor = loaded[path]
            if model is reference:  # the same checkpoint: evaluated on its own copy, the reference stays fixed
                model, processor = load(path)
            contexts = Contexts(processor, **settings)
            metrics = evaluate(model, processor, dataset, reference=reference, contexts=contexts, desc=name,
                               **kwargs)
            if predictions_dir is not None:
                os.makedirs(predictions_dir, exist_ok=True)
                metrics = write_predictions(metrics, os.path.join(predictions_dir, f"{name}.predictions.jsonl"))
            results[name] = {k: v for k, v in metrics.items() if k != "predictions"}
    if reference is not None and "baseline" in results:
        results["kl_gap_closure"] = kl_gap_closure(results["baseline"]["kl_teacher_student"],
                                                   results["model"]["kl_teacher_student"])
    return results
