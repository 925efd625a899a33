"""Procedural tasks with exact scorers, as `datasets.Dataset`s in the standard layout: visual reasoning (maze,
jigsaw) and a text task (arithmetic, whose worked solution is the `privileged_context`).

    from opsd_trl.tasks import make_dataset, score
    ds = make_dataset("maze", "train", 1000, size=3, seed=0)
    ok = score(ds[0]["task"], ds[0]["meta"], "R D")

Splits are disjoint by content (a hash of the maze layout / the jigsaw picture and shuffle / the expression), not by
seed.
"""

from __future__ import annotations

from collections.abc import Callable

from datasets import Dataset

from . import arithmetic, jigsaw, maze
from .common import FEATURES, SPLITS, split_of, to_dataset
from .vlmevalkit import load_vlmevalkit_tsv

# task name -> (row builder, scorer, parser). A row builder takes (split, n, **params) and returns standard-layout
# rows; the parser returns what a completion commits to (moves, piece order) or None.
TASKS: dict[str, tuple[Callable[..., list[dict]], Callable[..., bool], Callable[[str], object]]] = {
    "maze": (maze.make_rows, maze.score, maze.parse_moves),
    "jigsaw": (jigsaw.make_rows, jigsaw.score, jigsaw.parse_order),
    "arithmetic": (arithmetic.make_rows, arithmetic.score, arithmetic.parse_value),
}


def make_dataset(task: str, split: str, n: int, *, seed: int = 0, **params) -> Dataset:
    """n samples of `task` for `split` ("train" | "validation" | "test"), deterministic in (seed, params).

    Task parameters (keyword only): see `maze.make_rows` (size, hole_prob, min_path_len, max_path_len, cell_px,
    answer_format, prompt, rules, vts, dedupe, split_fractions) and `jigsaw.make_rows` (rows, cols, piece_px, prompt,
    dedupe, split_fractions) and `arithmetic.make_rows` (n_ops, max_operand, ops, prompt, dedupe, split_fractions).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    return to_dataset(TASKS[task][0](split, n, seed=seed, **params))


def score(task: str, meta: str | dict, completion: str) -> bool:
    """Exact, judge-free scorer: True iff `completion` solves the sample described by `meta`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    return TASKS[task][1](meta, completion)


def parse(task: str, completion: str):
    """What `completion` commits to, as the scorer reads it (maze: a move string; jigsaw: a piece order), or None."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    return TASKS[task][2](completion)


__all__ = ["FEATURES", "SPLITS", "TASKS", "load_vlmevalkit_tsv", "make_dataset", "parse", "score", "split_of"]
