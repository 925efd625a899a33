"""VT cache: round trip, resume after a kill, corruption, manifest checks, bad input, CLI."""

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from opsd_trl.testing.synthetic_encoder import SyntheticEncoder
from opsd_trl.vt_cache import (
    BadImageError,
    VisionEncoder,
    VTCache,
    VTCacheCorruptError,
    VTCacheError,
    VTCacheMismatchError,
    build_vt_cache,
    check_compatible,
    import_vt_embeddings,
    verify_vt_cache,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_image(seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    h, w = 28 + 14 * (seed % 4), 56 + 14 * (seed % 3)
    return Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8))


def make_samples(n: int = 12) -> list[dict]:
    # 0..3 VTs per sample (some samples have none), varied sizes -> varied token counts.
    return [{"id": f"s{i}", "vt_images": [make_image(10 * i + j) for j in range(i % 4)]} for i in range(n)]


@pytest.fixture(scope="module")
def qwen25():
    from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl

    model, processor = build_tiny_qwen2_5_vl(seed=0)
    model.requires_grad_(False)  # the trainer freezes the tower when it uses a cache
    return model, processor


def build(samples, encoder, out, **kw):
    kw = {"batch_size": 3, "shard_bytes": 4000, "progress": False, **kw}
    return build_vt_cache(samples, encoder, out, **kw)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_round_trip_equals_direct_encoding(tmp_path, family, qwen25):
    if family == "qwen3_vl":
        from opsd_trl.testing.tiny_models import build_tiny_qwen3_vl

        model, processor = build_tiny_qwen3_vl(seed=0)
        model.requires_grad_(False)
    else:
        model, processor = qwen25
    encoder = VisionEncoder(model, processor)
    samples = make_samples()
    cache = VTCache(build(samples, encoder, tmp_path / "c"))
    assert len(cache.manifest["shards"]) > 1 and len(cache) == len(samples)
    assert cache.manifest["model_family"] == family and cache.hidden_size == 128
    for s in samples:
        entry, direct = cache[s["id"]], encoder.encode(s["vt_images"])  # direct = one sample per call
        assert len(entry.embeds) == len(direct) == len(s["vt_images"])
        for j, d in enumerate(direct):
            torch.testing.assert_close(entry.embeds[j], d.embeds, atol=1e-5, rtol=1e-5)
            assert entry.grid_thw[j].tolist() == list(d.grid_thw)
            assert entry.embeds[j].shape[0] == int(np.prod(d.grid_thw)) // 4  # 2x2 merge
            if family == "qwen3_vl":
                torch.testing.assert_close(entry.deepstack[j], d.deepstack, atol=1e-5, rtol=1e-5)
        if family == "qwen2_5_vl":
            assert entry.deepstack is None
    assert verify_vt_cache(cache.path) == []
    check_compatible(cache, model, processor)


ENCODERS = {
    "synthetic": "from opsd_trl.testing.synthetic_encoder import SyntheticEncoder as make_encoder",
    "qwen2_5_vl": textwrap.dedent("""
        from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl
        from opsd_trl.vt_cache import VisionEncoder
        def make_encoder():
            return VisionEncoder(*build_tiny_qwen2_5_vl(seed=0))
    """),
}


class KilledAfter:
    """An encoder that kills its process (os._exit: no cleanup, like a kill) when asked for the batch after
    ``batches`` batches of VT images; otherwise the wrapped encoder."""

    def __init__(self, encoder, batches: int):
        self.encoder, self.batches = encoder, batches

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode(self, images):
        if images:  # the VT call of a batch (without problem columns, the other call is empty)
            if self.batches == 0:
                os._exit(3)
            self.batches -= 1
        return self.encoder.encode(images)


def run_build(out, encoder: str, exit_after: int, **kw) -> int:
    """Build in a fresh interpreter killed once ``exit_after`` samples are processed (at the next batch)."""
    batches = -(-exit_after // 3)  # build()'s batch_size
    script = "\n".join([
        f"import sys; sys.path.insert(0, {os.path.join(REPO, 'tests')!r})",
        "from test_vt_cache import KilledAfter, make_samples, build",
        ENCODERS[encoder],
        f"build(make_samples(), KilledAfter(make_encoder(), {batches}), {str(out)!r}, **{kw!r})",
    ])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert (out / "progress.json").exists() and not (out / "manifest.json").exists()
    return proc.returncode


@pytest.mark.parametrize("encoder", ["synthetic", pytest.param("qwen2_5_vl", marks=pytest.mark.slow)])
def test_killed_build_resumes_to_identical_bytes(tmp_path, encoder):
    out, kw = tmp_path / "resumed", {"shard_bytes": 1500}
    run_build(out, encoder, exit_after=7, **kw)
    assert any(p.name.startswith("shard-") for p in out.iterdir())
    namespace = {}
    exec(ENCODERS[encoder], namespace)
    enc = namespace["make_encoder"]()
    build(make_samples(), enc, out, **kw)
    build(make_samples(), enc, tmp_path / "straight", **kw)
    names = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert names == sorted(p.name for p in out.iterdir()) and "progress.json" not in names
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_resume_refuses_changed_settings(tmp_path):
    out = tmp_path / "c"
    run_build(out, "synthetic", exit_after=9, shard_bytes=1500)
    with pytest.raises(VTCacheError, match="dtype"):
        build(make_samples(), SyntheticEncoder(), out, shard_bytes=1500, dtype="bfloat16")
    with pytest.raises(VTCacheError, match="resume"):
        build(make_samples(), SyntheticEncoder(), out, shard_bytes=1500, resume=False)


@pytest.fixture
def synthetic_cache(tmp_path):
    return build(make_samples(), SyntheticEncoder(deepstack_levels=2), tmp_path / "c")


def test_flipped_byte_detected_by_verify_and_load(synthetic_cache):
    shard = synthetic_cache / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's data
    shard.write_bytes(bytes(data))
    problems = verify_vt_cache(synthetic_cache)
    assert len(problems) == 1 and "shard-00001.safetensors" in problems[0]
    cache = VTCache(synthetic_cache)
    in_shard = [i for i in cache.ids() if cache._index[i]["shard"] == shard.name and cache._index[i]["images"]]
    with pytest.raises(VTCacheCorruptError, match="shard-00001.safetensors"):
        for sid in in_shard:
            cache[sid]
    assert all(len(cache[i].embeds) == len(cache._index[i]["images"]) for i in cache.ids() if i not in in_shard)


def test_truncated_shard_detected_by_verify_and_load(synthetic_cache):
    shard = synthetic_cache / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert any("shard-00000.safetensors" in p and "truncated" in p for p in verify_vt_cache(synthetic_cache))
    cache = VTCache(synthetic_cache)
    sid = next(i for i in cache.ids() if cache._index[i]["shard"] == shard.name and cache._index[i]["images"])
    with pytest.raises(VTCacheCorruptError, match="shard-00000.safetensors.*truncated"):
        cache[sid]


def test_altered_index_refused(synthetic_cache):
    index = synthetic_cache / "index.json"
    index.write_text(index.read_text().replace('"s1"', '"s1x"'))
    assert "index" in verify_vt_cache(synthetic_cache)[0]
    with pytest.raises(VTCacheCorruptError, match="index"):
        VTCache(synthetic_cache)


def test_manifest_mismatch_refused(tmp_path, qwen25):
    from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl, build_tiny_qwen3_vl

    model, processor = qwen25
    cache = build(make_samples(4), VisionEncoder(model, processor), tmp_path / "c")
    other, _ = build_tiny_qwen2_5_vl(seed=1)
    other.requires_grad_(False)
    with pytest.raises(VTCacheMismatchError, match="vision_weights_sha256"):
        check_compatible(cache, other, processor)
    _, resized = build_tiny_qwen2_5_vl(seed=0)
    resized.image_processor.image_mean = [0.5, 0.5, 0.5]
    with pytest.raises(VTCacheMismatchError, match=r"processor_sha256.*image_mean"):
        check_compatible(cache, model, resized)
    q3, q3_processor = build_tiny_qwen3_vl(seed=0)
    with pytest.raises(VTCacheMismatchError, match="model_family"):
        check_compatible(cache, q3, q3_processor)


def test_trainable_vision_tower_needs_opt_in(tmp_path, qwen25):
    model, processor = qwen25
    cache = build(make_samples(4), VisionEncoder(model, processor), tmp_path / "c")
    model.model.visual.merger.requires_grad_(True)
    try:
        with pytest.raises(VTCacheError, match="trainable"):
            check_compatible(cache, model, processor)
        with pytest.warns(UserWarning, match="stale"):
            check_compatible(cache, model, processor, allow_trainable_vision=True)
    finally:
        model.requires_grad_(False)


def test_corrupt_image_names_sample_and_column(tmp_path):
    samples = make_samples(6)
    buf = io.BytesIO()
    make_image(0).save(buf, format="PNG")
    samples[4]["extra_vts"] = buf.getvalue()[:60]  # truncated PNG
    with pytest.raises(BadImageError, match=r"'s4'.*'extra_vts'"):
        build(samples, SyntheticEncoder(), tmp_path / "a", vt_columns=["vt_images", "extra_vts"])
    out = build(samples, SyntheticEncoder(), tmp_path / "b", vt_columns=["vt_images", "extra_vts"], skip_bad=True)
    skipped = json.loads((out / "skipped.json").read_text())
    assert [s["id"] for s in skipped] == ["s4"] and "extra_vts" in skipped[0]["error"]
    cache = VTCache(out)
    assert "s4" not in cache and len(cache) == 5 and cache.manifest["num_skipped"] == 1


def test_duplicate_ids_refused(tmp_path):
    samples = make_samples(4)
    samples[3]["id"] = "s1"
    with pytest.raises(VTCacheError, match="duplicate.*s1"):
        build(samples, SyntheticEncoder(), tmp_path / "c")


def _read_all(cache, ids):
    return [cache[i].embeds for i in ids]


def test_loader_in_dataloader_workers(synthetic_cache):
    cache = VTCache(synthetic_cache)
    ids = list(cache.ids())
    cache[ids[1]]  # parent opens a handle before the workers fork
    loader = torch.utils.data.DataLoader(ids, batch_size=4, num_workers=2, collate_fn=lambda b: _read_all(cache, b))
    got = [e for batch in loader for e in batch]
    for sid, embeds in zip(ids, got, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(embeds, cache[sid].embeds, strict=True))


def test_import_text_vt_embeddings(tmp_path):
    from safetensors.torch import save_file

    from opsd_trl.testing.tiny_models import build_tiny_text_lm

    src = tmp_path / "vt.safetensors"
    save_file({"a": torch.randn(5, 64), "b": torch.randn(2, 3, 64)}, src)
    cache = VTCache(import_vt_embeddings(src, tmp_path / "c", shard_bytes=1000))
    assert [e.shape for e in cache["b"].embeds] == [(3, 64), (3, 64)] and cache["a"].grid_thw is None
    assert verify_vt_cache(cache.path) == []
    model, _ = build_tiny_text_lm()
    check_compatible(cache, model)
    save_file({"c": torch.randn(5, 32)}, tmp_path / "small.safetensors")
    with pytest.raises(VTCacheMismatchError, match="hidden_size"):
        check_compatible(import_vt_embeddings(tmp_path / "small.safetensors", tmp_path / "d"), model)


def test_cli_build_and_verify(tmp_path, qwen25, capsys):
    import datasets

    from opsd_trl.cli import main
    from opsd_trl.testing.tiny_models import save_tiny

    save_tiny(*qwen25, tmp_path / "model")
    samples = make_samples(5)
    ds = datasets.Dataset.from_list(samples, features=datasets.Features(
        {"id": datasets.Value("string"), "vt_images": datasets.List(datasets.Image())}))
    ds.save_to_disk(tmp_path / "ds")
    args = ["build-vt-cache", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "ds"),
            "--output", str(tmp_path / "c"), "--dtype", "float32", "--shard-size", "4kB", "--no-progress"]
    assert main(args) == 0
    cache = VTCache(tmp_path / "c")
    direct = VisionEncoder(*qwen25).encode(samples[3]["vt_images"])
    torch.testing.assert_close(cache["s3"].embeds[2], direct[2].embeds, atol=1e-5, rtol=1e-5)
    assert main(["verify-vt-cache", str(tmp_path / "c")]) == 0
    shard = tmp_path / "c" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    assert main(["verify-vt-cache", str(tmp_path / "c")]) == 1
    assert "shard-00000.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("option,value,message", [
    ("--batch-size", "-3", "must be >= 1, got -3"),
    ("--batch-size", "0", "must be >= 1, got 0"),
    ("--batch-size", "two", "not an integer: 'two'"),
    ("--shard-size", "0", "must be at least 1 byte"),
])
def test_cli_refuses_non_positive_batch_and_shard_sizes(tmp_path, capsys, option, value, message):
    from opsd_trl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["build-vt-cache", "--model", str(tmp_path / "m"), "--dataset", str(tmp_path / "d"), "--output",
              str(tmp_path / "c"), option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # nothing written, so nothing can verify as OK
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        build(make_samples(2), SyntheticEncoder(), tmp_path / "c", batch_size=-3)


@pytest.mark.parametrize("missing", ["index.json", "manifest.json"])
def test_cache_missing_index_or_manifest_is_reported_not_a_traceback(synthetic_cache, capsys, missing):
    from opsd_trl.cli import main

    (synthetic_cache / missing).unlink()
    assert main(["verify-vt-cache", str(synthetic_cache)]) == 1  # reported, exit 1, no exception
    err = capsys.readouterr().err
    assert (f"{synthetic_cache / missing}: missing" if missing == "index.json" else "no manifest (manifest.json)") in err
    with pytest.raises(VTCacheError, match="no index \\(index.json\\)" if missing == "index.json" else "no manifest"):
        VTCache(synthetic_cache)


def test_training_with_a_cache_missing_its_index(synthetic_cache, capsys, tmp_path):
    from trainer_utils import make_trainer, vl_dataset

    from opsd_trl.cli import main
    from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl

    (synthetic_cache / "index.json").unlink()
    # opsd-trl train: a start-up check, exit 2, before any weights load
    rc = main(["train", "--config", os.path.join(REPO, "recipes/cpu_quickstart.yaml"), "--init_weights", "none",
               "--vt_cache_dir", str(synthetic_cache), "--output_dir", str(tmp_path / "run")])
    assert rc == 2 and "(index.json missing)" in capsys.readouterr().err
    # the trainer from Python
    model, processor = build_tiny_qwen2_5_vl()
    model.model.visual.requires_grad_(False)
    with pytest.raises(VTCacheError, match="no index"):
        make_trainer(model, processor, vl_dataset(n=2), tmp_path, vt_cache_dir=str(synthetic_cache))


def test_foreign_manifest_and_unreadable_index_are_reported(synthetic_cache, capsys):
    from opsd_trl.cli import main

    manifest = synthetic_cache / "manifest.json"
    original = manifest.read_text()
    manifest.write_text("{}")
    assert main(["verify-vt-cache", str(synthetic_cache)]) == 1
    assert "not a VT cache manifest of format_version 1" in capsys.readouterr().err
    manifest.write_text(original)
    (synthetic_cache / "index.json").write_text("not json")
    with pytest.raises(VTCacheCorruptError, match="unreadable index"):
        VTCache(synthetic_cache, verify="none")
    assert main(["verify-vt-cache", str(synthetic_cache)]) == 1
    assert "index.json: sha256 does not match" in capsys.readouterr().err


def test_cli_build_refuses_a_text_lm_or_a_missing_model_folder(tiny_model_dirs, tmp_path):
    import datasets

    from opsd_trl.cli import main

    datasets.Dataset.from_list(make_samples(2)).save_to_disk(tmp_path / "ds")
    args = ["build-vt-cache", "--dataset", str(tmp_path / "ds"), "--output", str(tmp_path / "c"), "--no-progress"]
    with pytest.raises(ValueError, match="model_type 'qwen2' has no VT encoder"):
        main([*args, "--model", tiny_model_dirs["text_lm"]])
    with pytest.raises(FileNotFoundError, match="model folder .*absent not found"):
        main([*args, "--model", str(tmp_path / "absent")])
