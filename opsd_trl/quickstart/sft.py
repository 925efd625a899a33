"""Warm-start SFT on both contexts, so the tiny policy can read images before Visual-OPSD starts.

Each step trains with cross-entropy on the reference answers in the teacher context (problem image + VTs), for each
sample of the batch with probability `teacher_share`, and in the student context (problem image only) with
probability `1 - teacher_share`; the two draws are independent, so a sample can be in both contexts or in neither.
Without this the random-init policy has nothing to distil: the teacher must already use its VTs better than the
student uses the image. Sequences are built by `opsd_trl.eval.completion_logits`, i.e. exactly the contexts training
and eval use.

A hand loop, not the HF `Trainer` / TRL `SFTTrainer`: the shipped warm-start (`quickstart_warmstart.safetensors`,
keyed by its settings) must stay reproducible bit for bit, and the Trainer would change the updates. Its sampler
yields epoch permutations from a torch generator, where this loop draws each batch with `random.Random(seed).sample`
(no repeats within a step, independent steps) from the same stream as the per-sample context draws; its loss is one
token mean per batch, where this one is a token mean per context weighted by the context's share of the batch, over
two forwards; its default optimizer is the fused AdamW kernel (other rounding than `torch.optim.AdamW`); and the
schedule below is none of transformers' schedulers. Reproducing all of it would take a custom sampler, collator,
`compute_loss`, optimizer and scheduler: the same loop, spread over Trainer hooks.
"""

from __future__ import annotations

import math
import random

import torch
from tqdm.auto import tqdm

from ..eval import Contexts, completion_logits
from ..tasks.maze import detour_answer


def answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def warm_start(model, contexts: Contexts, dataset, *, steps: int, batch_size: int = 32, lr: float = 2e-3,
               warmup: int = 30, teacher_share: float = 0.5, seed: int = 0, progress: bool = True,
               desc: str = "warm-start SFT", on_step=None, detour_share: float = 0.0,
               answer_format: str = "numbered") -> list[float]:
    """Train `model` in place; returns the loss per step. Pixels are preprocessed once per sample and context.

    `teacher_share=0` is the supervised baseline (reference answers in the student context only). `on_step(step)`,
    if given, runs after every optimizer step (validation curves) and may return more numbers for the progress bar.
    `detour_share`: the share of teacher-context samples whose answer first takes one move away from the goal
    (`maze.detour_answer`, in `answer_format`), with no loss on that move: the teacher learns to read its VTs from a
    state off the route (for the policy-map VT). At 0 the random stream is the one without detours, draw for draw."""
    rows = list(dataset)
    rng = random.Random(seed)
    pixels = {}  # (row index, teacher) -> processor output; the vision tower trains, so features are recomputed

    def row_pixels(i: int, teacher: bool) -> dict:
        if (i, teacher) not in pixels:
            pixels[i, teacher] = contexts.pixels(contexts.images(rows[i], teacher))
        return pixels[i, teacher]

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    # Not transformers' `get_cosine_schedule_with_warmup`: that one ramps from 0 (s / warmup) and runs its cosine
    # over the steps after warmup; this one ramps from 1 / warmup and multiplies the ramp by a cosine over all steps.
    # The learning rates differ at every step (e.g. step 0: 0 vs lr / warmup), so the shipped warm-start and the
    # supervised baseline of the quickstart table would not be reproduced.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        batch = rng.sample(range(len(rows)), min(batch_size, len(rows)))
        loss = torch.zeros(())
        for teacher in (False, True):  # one forward per context; a fresh draw per sample and context
            idx = [i for i in batch if (rng.random() < teacher_share) == teacher]
            if not idx:
                continue
            targets, skips = [], []
            for i in idx:
                detour = (detour_answer(rows[i]["meta"], answer_format, rng)
                          if teacher and detour_share > 0 and rng.random() < detour_share else None)
                targets.append(answer_ids(contexts.tokenizer, rows[i]["answer"] if detour is None else " ".join(detour)))
                skips.append(0 if detour is None else len(contexts.tokenizer(detour[0], add_special_tokens=False)
                                                          ["input_ids"]))
            logits, mask = completion_logits(model, contexts, [rows[i] for i in idx], targets, teacher,
                                             pixels=[row_pixels(i, teacher) for i in idx])
            for j, skip in enumerate(skips):
                mask[j, :skip] = False  # no loss on the detour move itself
            labels = torch.nn.utils.rnn.pad_sequence([torch.tensor(t) for t in targets], batch_first=True)
            ce = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
            loss = loss + ce / mask.sum() * len(idx) / len(batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        shown = {}
        if on_step is not None:
            shown = on_step(step + 1) or {}
            model.train()  # a validation point leaves the model in eval mode
        bar.set_postfix({"loss": f"{loss.item():.3f}", **shown}, refresh=False)
    model.eval()
    return losses
