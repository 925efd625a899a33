"""Problem-image features computed once per sample and reused, while the vision tower is frozen.

A frozen tower gives the same features to the teacher forward (whatever its weights: the EMA / fixed shadow only
covers trainable parameters) and to the student forward, and the same features at every epoch. So per micro-batch
the problem images are encoded by one vision-tower call (or read from the VT cache, which can store them beside
the VTs), and both forwards splice those rows at the image placeholders, as the teacher splices VT features.
With a trainable tower each forward keeps encoding its own images (the student's features need their gradient).

Only for families whose adapter says `shares_problem_features` (Qwen-VL: the student forward is the model's own
splice + M-RoPE); BAGEL's student forward keeps its own path.
"""

from __future__ import annotations

import torch
from torch import nn

from .models.adapters import SlotFeatures
from .vt_cache import VTCacheMismatchError, problem_digest


def reusable(adapter, model: nn.Module, enabled: bool) -> bool:
    """True when problem-image features are shared: `enabled` (the config's `reuse_problem_image_features`) and a
    policy whose adapter shares them and whose vision tower (and projector) has no trainable parameter."""
    if not enabled or not adapter.shares_problem_features:
        return False
    return not any(p.requires_grad for p in adapter.vision_tower(model).parameters())


def cached_problem_slots(cache, samples: list[dict], grid_thw: torch.Tensor | None,
                         num_images: list[int] | None) -> list[list[SlotFeatures] | None]:
    """Per sample, its problem-image features from the VT cache (None where the cache holds none).

    `grid_thw`: the student batch's patch grids `(n_images, 3)` (None without images), `num_images`: the samples'
    image counts (None: no images).
    """
    grids = grids_per_sample(grid_thw, num_images or [0] * len(samples))
    return [_cached_slots(cache, x, g) for x, g in zip(samples, grids, strict=True)]


def _cached_slots(cache, sample: dict, grid_thw: torch.Tensor | None) -> list[SlotFeatures] | None:
    """The sample's problem-image features from the VT cache, or None when the cache holds none for it.

    `grid_thw`: the student's patch grids of this sample's images `(n, 3)` (None without images). The cached
    images must be the sample's images (digest of the decoded pixels) and have their grids, else the cache was
    built from other data or another image processor: that raises, naming the sample.
    """
    if cache is None or sample["id"] not in cache:
        return None
    reader = getattr(cache, "problem_images", None)  # a VTCache reads them without the VTs
    cached = reader(sample["id"]) if reader is not None else getattr(cache[sample["id"]], "problem", None)
    if cached is None:
        return None
    images = sample.get("images") or []
    n = 0 if grid_thw is None else len(grid_thw)
    if cached.digest != problem_digest(images) or len(cached.embeds) != n or (
        n and not torch.equal(cached.grid_thw, grid_thw.cpu())
    ):
        raise VTCacheMismatchError(
            f"sample {sample['id']!r}: the VT cache's problem-image features were encoded from other images (or "
            "with other image-processor settings) than the sample's (other pixels, number or order); rebuild the cache "
            "over this dataset with `opsd-trl build-vt-cache`."
        )
    if not n:
        return []
    deep = cached.deepstack or [None] * n
    return [SlotFeatures(e, g, d) for e, g, d in zip(cached.embeds, cached.grid_thw, deep, strict=True)]


def grids_per_sample(grid_thw: torch.Tensor | None, counts: list[int]) -> list[torch.Tensor | None]:
    """Split the batch's image grids `(n_images, 3)` by the samples' image counts."""
    if grid_thw is None:
        return [None] * len(counts)
    return list(torch.split(grid_thw, counts))


def problem_image_slots(adapter, model: nn.Module, inputs: dict) -> list[SlotFeatures] | None:
    """One `SlotFeatures` per problem image of the micro-batch, row-major: the cached ones (`problem_slots_cached`,
    per sample, None where not cached), the others encoded by one vision-tower call. None without images."""
    pixel_values, grids = inputs.get("pixel_values"), inputs.get("image_grid_thw")
    if pixel_values is None or grids is None:
        return None
    counts = inputs.get("num_images") or [len(grids)]
    cached = inputs.get("problem_slots_cached") or [None] * len(counts)
    patches = grids.prod(-1).tolist()  # pixel rows per image
    starts = [0]
    for p in patches:
        starts.append(starts[-1] + p)
    todo, image = [], 0  # images to encode now
    for n, hit in zip(counts, cached, strict=True):
        if hit is None:
            todo += range(image, image + n)
        image += n
    encoded = []
    if todo:
        if len(todo) == len(patches):  # the whole batch: the same call (and bits) as the model's own forward
            rows = pixel_values
        else:
            rows = torch.cat([pixel_values[starts[i] : starts[i + 1]] for i in todo])
        encoded = adapter.encode_images(model, rows, grids[todo])
    fresh = iter(encoded)
    slots = []
    for n, hit in zip(counts, cached, strict=True):
        slots += hit if hit is not None else [next(fresh) for _ in range(n)]
    return slots


def student_hidden_states(adapter, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          slots: list[SlotFeatures], logits_to_keep: int) -> torch.Tensor:
    """The student's last hidden states on the completion positions `(B, logits_to_keep, H)`, with the problem
    images' features spliced at their placeholders (the model's own forward does the same splice and M-RoPE after
    running the tower)."""
    slot_mask = input_ids == adapter.image_token_id
    hidden = adapter.teacher_hidden_states(model, input_ids, attention_mask, slot_mask, slots)
    return hidden[:, -logits_to_keep - 1 : -1, :]
