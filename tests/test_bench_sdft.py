"""benchmarks/bench_sdft.py's warm start: its training expressions and its cache folder (the benchmark itself is
not a test; these parts are pure and cheap)."""

import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path

from opsd_trl.tasks import make_dataset, split_of

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling `report`
    try:
        spec = importlib.util.spec_from_file_location("bench_sdft", BENCH / "bench_sdft.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_warm_start_expressions_are_training_ones_disjoint_from_the_distillation_ones():
    bench = _bench()
    steps, batch, n = 16, 4, 64
    warm = bench.warm_data(steps, batch, n)
    distill, _ = bench.data(steps, batch, 10)
    expr = lambda rows: [json.loads(m)["expression"] for m in rows["meta"]]  # noqa: E731
    warm_expr, distill_expr = expr(warm), expr(distill)
    assert len(warm_expr) == len(set(warm_expr)) == n
    assert not set(warm_expr) & set(distill_expr)
    assert {split_of(e) for e in warm_expr} == {"train"}  # held-out expressions are never trained on
    # The same draws as the task's own dataset (seed 1), minus the distillation ones, in order.
    pool = make_dataset("arithmetic", "train", 4 * n, seed=1, dedupe=True, **bench.TASK_KWARGS)
    assert warm_expr == [e for e in expr(pool) if e not in set(distill_expr)][:n]


def test_warm_start_folder_is_named_by_every_setting_it_depends_on():
    bench = _bench()
    base = dict(warm_start_steps=16, warm_start_lr=1e-5, batch=4, steps=16)
    assert bench.warm_start_dir(Namespace(**{**base, "warm_start_steps": 0})) is None
    names = {bench.warm_start_dir(Namespace(**{**base, **change})).name
             for change in ({}, {"warm_start_steps": 8}, {"warm_start_lr": 3e-5}, {"batch": 2}, {"steps": 24})}
    assert len(names) == 5
