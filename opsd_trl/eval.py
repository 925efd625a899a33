"""Evaluation: exact-scorer accuracy, output length, generation latency, teacher-vs-student KL, KL-gap closure.

Definitions (docs/metrics.md):
- accuracy: share of samples whose greedy completion the task's exact scorer (`opsd_trl.tasks.score`) accepts;
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
from .diagnostics import full_vocab_kl
from .generation import HFGenerator, SamplingSettings
from .models.adapters import get_adapter
from .models.loading import load_pretrained, load_quickstart_weights
from .tasks import parse, score
from .tasks.common import load_meta
from .teacher_context import TeacherContext, placeholders_per_image


@dataclass
class Contexts:
    """How to render a sample's student or teacher context for one processing class: the trainer's builder
    (`opsd_trl.teacher_context.TeacherContext`), so eval sees the sequences training sees. `intro` / `transition`
    default to `VisualOPSDConfig`'s; pass the run's own. A text LM (a tokenizer) reads `vt_text` as its VTs.
    `noise_vt` / `noise_vt_count`: the teacher is the noise-VT control's (pixel space, as the trainer's default),
    for diagnostics of what the noised teacher still knows."""

    processor: object
    intro: str = TEACHER_INTRO
    transition: str = TEACHER_TRANSITION
    max_vt_images: int = 8
    chat_template_kwargs: dict | None = None
    noise_vt: bool = False
    noise_vt_count: int | None = None

    def __post_init__(self):
        self.builder = TeacherContext(
            self.processor, intro=self.intro, transition=self.transition, uses_images=self.uses_images,
            chat_template_kwargs=self.chat_template_kwargs, max_vt_images=self.max_vt_images,
            noise_vt=self.noise_vt, noise_vt_count=self.noise_vt_count,
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
        return list(row.get("images") or []) + (self.builder.vt_images(row) if teacher else [])

    def pixels(self, images: list) -> dict:
        return dict(self.processor.image_processor(images=images, return_tensors="pt")) if images else {}

    def prompt_ids(self, row: dict, teacher: bool, grid_thw: torch.Tensor | None = None) -> tuple[list[int],
                                                                                              list[bool]]:
        """Token ids (image placeholders expanded) and the mask of image-feature slots."""
        tokens = placeholders_per_image(self.processor, grid_thw) if grid_thw is not None else []
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
    logits = hidden[:, width - 1 : -1, :] @ model.get_output_embeddings().weight.t()
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
    names += ["<|vision_start|>", "<|vision_end|>"]  # Qwen-VL delimiters
    return sorted({vocab[n] for n in names if n in vocab})


@torch.no_grad()
def evaluate(model, processor, dataset, *, reference=None, teacher_context: bool = False, batch_size: int = 64,
             max_new_tokens: int = 16, contexts: Contexts | None = None, progress: bool = True,
             desc: str = "eval") -> dict:
    """Greedy-decode every sample and score it; with `reference`, also the KL(T||S) diagnostic.

    `teacher_context=True` evaluates `model` as the teacher (VTs in its context): teacher-with-VT accuracy.
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
    for start in tqdm(range(0, len(rows_all), batch_size), desc=desc, disable=not progress, leave=False):
        rows = rows_all[start : start + batch_size]
        images = [contexts.images(r, teacher_context) for r in rows]
        pixels = [contexts.pixels(im) for im in images]
        prompts = [contexts.prompt_ids(r, teacher_context, p.get("image_grid_thw"))[0]
                   for r, p in zip(rows, pixels, strict=True)]
        t0 = time.perf_counter()
        completions = generator.generate(prompts, images).completion_ids
        gen_time += time.perf_counter() - t0
        for r, comp in zip(rows, completions, strict=True):
            text = contexts.tokenizer.decode(comp, skip_special_tokens=True)
            task = r.get("task") or "maze"
            predictions.append({"id": r.get("id"), "task": task, "meta": load_meta(r["meta"]), "completion": text,
                                "parsed": parse(task, text), "correct": bool(score(task, r["meta"], text))})
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
    """`(model, processor)` from a quickstart weights file (`.safetensors`) or a saved model folder of a
    vision-language family (`opsd_trl.models.loading`). Errors name the path and what to give instead."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"checkpoint {path} not found; give a model folder (the output_dir of opsd-trl train, or a "
            "save_pretrained folder) or a quickstart .safetensors weights file."
        )
    if path.endswith(".safetensors") and os.path.isfile(path):
        try:
            return load_quickstart_weights(path)
        except RuntimeError as e:
            raise ValueError(
                f"{path} is not a quickstart weights file (its tensors do not fit the quickstart model: "
                f"{str(e).splitlines()[0]}); give the model folder instead."
            ) from e
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is neither a model folder nor a .safetensors weights file.")
    model, processor = load_pretrained(path, dtype="float32")
    if getattr(processor, "image_processor", None) is None or not get_adapter(model).uses_images:
        raise ValueError(
            f"checkpoint {path} is a {model.config.model_type} model without an image processor; opsd-trl eval "
            "scores vision-language policies (Qwen2/2.5/3-VL, BAGEL, the quickstart model) on image tasks."
        )
    return model.eval(), processor


def _check_same_vocabulary(loaded: dict) -> None:
    """Every checkpoint of one evaluation shares the tokenizer: the KL compares their distributions token by token."""
    (first, (_, p0)), *rest = loaded.items()
    for path, (_, processor) in rest:
        if processor.tokenizer.get_vocab() != p0.tokenizer.get_vocab():
            raise ValueError(
                f"checkpoints {first} and {path} have different vocabularies ({len(p0.tokenizer)} vs "
                f"{len(processor.tokenizer)} tokens): the model, --baseline and --reference must be the same model "
                "family and tokenizer (checkpoints of one training run)."
            )


def evaluate_checkpoints(model_path: str, dataset, *, reference_path: str | None = None,
                         baseline_path: str | None = None, predictions_dir: str | None = None,
                         intro: str = TEACHER_INTRO, transition: str = TEACHER_TRANSITION, **kwargs) -> dict:
    """Metrics of `model_path` (and of `baseline_path`, then KL-gap closure between them) on `dataset`.

    `intro` / `transition` surround the VTs in the teacher context: the words the run trained with (the quickstart's
    are `opsd_trl.testing.quickstart_model.TEACHER_INTRO` / `TEACHER_TRANSITION`).

    The KL needs visual thoughts and a fixed reference teacher: `reference_path`, else the baseline. Rows without
    VTs (e.g. a VLMEvalKit TSV) get accuracy, tokens and latency only. Per-sample predictions go to
    `predictions_dir/{model,baseline}.predictions.jsonl` when it is given; the returned metrics never hold them.
    """
    reference_path = reference_path or baseline_path
    if len(dataset) == 0:
        raise ValueError("the evaluation dataset is empty: nothing to evaluate (check --n, --split or the TSV).")
    has_vts = any(dataset["vt_images"]) if "vt_images" in dataset.column_names else False
    paths = [p for p in (model_path, baseline_path, reference_path if has_vts else None) if p]
    loaded = {p: load_checkpoint(p) for p in dict.fromkeys(paths)}
    _check_same_vocabulary(loaded)
    reference = loaded[reference_path][0] if reference_path and has_vts else None
    results = {}
    for name, path in (("baseline", baseline_path), ("model", model_path)):
        if path:
            model, processor = loaded[path]
            if model is reference:  # the same checkpoint: evaluated on its own copy, the reference stays fixed
                model, processor = load_checkpoint(path)
            contexts = Contexts(processor, intro=intro, transition=transition)
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
