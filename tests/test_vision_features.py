"""Problem-image features encoded once per sample with a frozen vision tower: shared by the teacher and student
forwards of a step, and read from the VT cache across epochs. Tiny Qwen2.5-VL built from configs; the vision tower
calls are counted with a forward hook on the real tower."""

import pytest
import torch
from trainer_utils import generation_batch, make_trainer, square, vl_dataset

from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl
from opsd_trl.vt_cache import (
    VisionEncoder,
    VTCache,
    VTCacheMismatchError,
    VTEntry,
    build_vt_cache,
    verify_vt_cache,
)


def _frozen_vl():
    model, processor = build_tiny_qwen2_5_vl(seed=0)
    model.model.visual.requires_grad_(False)
    return model, processor


class _TowerCalls:
    """Counts vision-tower forwards and the images each one encodes (rows of its `grid_thw`)."""

    def __init__(self, model):
        self.images = []
        model.model.visual.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.images.append(len(grid))

    def reset(self):
        self.images.clear()


def _vt_only_cache(model, processor, dataset):
    """VT features only (so the tower calls counted in a step are the problem images')."""
    encoder = VisionEncoder(model, processor)
    cache = {}
    for x in dataset:
        enc = encoder.encode(x["vt_images"])
        cache[x["id"]] = VTEntry(embeds=[e.embeds for e in enc], grid_thw=torch.tensor([e.grid_thw for e in enc]),
                                 deepstack=None, columns=["vt_images"] * len(enc))
    return cache


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=None)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("teacher_mode", ["self", "ema"])
def test_teacher_and_student_share_one_encoding_bit_identically(tmp_path, teacher_mode):
    model, processor = _frozen_vl()
    dataset = vl_dataset(n=2)
    trainer = make_trainer(model, processor, dataset, tmp_path, vt_cache=_vt_only_cache(model, processor, dataset),
                           teacher_mode=teacher_mode, max_completion_length=8)
    batch = generation_batch(trainer, dataset)
    calls = _TowerCalls(model)
    shared, shared_grads = _loss_and_grads(trainer, batch)
    assert calls.images == [2], calls.images  # one call, both samples' problem images, for teacher and student
    calls.reset()
    trainer.args.reuse_problem_image_features = False  # each forward runs the tower (the path before sharing)
    separate, separate_grads = _loss_and_grads(trainer, batch)
    assert calls.images == [2, 2], calls.images
    assert torch.equal(shared, separate), (shared.item(), separate.item())
    assert shared_grads.keys() == separate_grads.keys() and shared_grads
    for name, g in shared_grads.items():
        assert torch.equal(g, separate_grads[name]), name


def test_trainable_tower_keeps_encoding_in_each_forward(tmp_path):
    model, processor = build_tiny_qwen2_5_vl(seed=0)  # tower trainable
    dataset = vl_dataset(n=2)
    trainer = make_trainer(model, processor, dataset, tmp_path, vt_cache=_vt_only_cache(model, processor, dataset),
                           teacher_mode="self", max_completion_length=8)
    batch = generation_batch(trainer, dataset)
    calls = _TowerCalls(model)
    _, grads = _loss_and_grads(trainer, batch)
    assert calls.images == [2, 2]
    assert any(n.startswith("model.visual.") for n in grads)  # the student's features still carry their gradient


@pytest.fixture
def cached_setup(tmp_path):
    model, processor = _frozen_vl()
    dataset = vl_dataset(n=3)
    build_vt_cache(dataset, VisionEncoder(model, processor), tmp_path / "cache", problem_columns=["images"],
                   batch_size=2, progress=False)
    return model, processor, dataset, tmp_path / "cache"


def test_cached_problem_features_need_no_tower_call_and_match_encoding(tmp_path, cached_setup):
    model, processor, dataset, path = cached_setup
    assert verify_vt_cache(path) == []
    cache = VTCache(path)
    assert cache.manifest["num_problem_images"] == 3 and cache.manifest["problem_columns"] == ["images"]
    trainer = make_trainer(model, processor, dataset, tmp_path, vt_cache=cache, teacher_mode="self",
                           max_completion_length=8)
    batch = generation_batch(trainer, dataset)
    assert all(slots is not None for slots in batch["problem_slots_cached"])
    calls = _TowerCalls(model)
    cached, cached_grads = _loss_and_grads(trainer, batch)
    assert calls.images == []  # no tower call in the step's forwards
    calls.reset()
    trainer.args.reuse_problem_image_features = False
    encoded, encoded_grads = _loss_and_grads(trainer, batch)
    assert calls.images == [2, 2]
    # The cache encoded the images in other batches (build batch 2, problem images apart from the VTs): equal up
    # to the order of floating-point operations inside the tower.
    assert torch.allclose(cached, encoded, rtol=0, atol=1e-6), (cached.item(), encoded.item())
    for name, g in cached_grads.items():
        assert torch.allclose(g, encoded_grads[name], rtol=1e-5, atol=1e-6), name


def test_a_sample_missing_from_the_cache_is_encoded_alone(tmp_path, cached_setup):
    model, processor, dataset, path = cached_setup
    cache = VTCache(path)
    dict_cache = {x["id"]: cache[x["id"]] for x in dataset}
    dict_cache["s1"].problem = None  # s1's problem image not cached: the step encodes it, and only it
    trainer = make_trainer(model, processor, dataset, tmp_path, vt_cache=dict_cache, teacher_mode="self",
                           max_completion_length=8)
    batch = generation_batch(trainer, dataset)
    calls = _TowerCalls(model)
    _loss_and_grads(trainer, batch)
    assert calls.images == [1]


def test_changed_problem_image_is_refused_naming_the_sample(tmp_path, cached_setup):
    model, processor, dataset, path = cached_setup
    changed = dataset.map(lambda x: {"images": [square((1, 2, 3))] if x["id"] == "s1" else x["images"]})
    trainer = make_trainer(model, processor, changed, tmp_path, vt_cache=VTCache(path), teacher_mode="self",
                           max_completion_length=8)
    with pytest.raises(VTCacheMismatchError, match="'s1'"):
        generation_batch(trainer, changed)


def test_problem_columns_leave_the_vt_tensors_unchanged(tmp_path):
    model, processor = _frozen_vl()
    dataset = vl_dataset(n=3)
    encoder = VisionEncoder(model, processor)
    with_problem = VTCache(build_vt_cache(dataset, encoder, tmp_path / "a", problem_columns=["images"],
                                          batch_size=2, progress=False))
    vt_only = VTCache(build_vt_cache(dataset, encoder, tmp_path / "b", batch_size=2, progress=False))
    assert "problem_columns" not in vt_only.manifest
    for x in dataset:
        a, b = with_problem[x["id"]], vt_only[x["id"]]
        assert b.problem is None and a.problem is not None
        assert all(torch.equal(u, v) for u, v in zip(a.embeds, b.embeds, strict=True))
        direct = encoder.encode(x["images"])
        assert torch.equal(a.problem.grid_thw, torch.tensor([d.grid_thw for d in direct]))
        for cached, d in zip(a.problem.embeds, direct, strict=True):
            assert torch.allclose(cached, d.embeds, rtol=0, atol=1e-6)
