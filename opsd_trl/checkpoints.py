"""Atomic checkpoints: a checkpoint folder counts only once everything in it (model, optimizer, scheduler, RNG,
trainer state, teacher shadow on every rank) is on disk.

A marker file is created before the first byte is written and removed (one atomic unlink) after all ranks have
finished; resume skips any folder that still holds it, so a run killed mid-save resumes from the previous one.
"""

from __future__ import annotations

import os
import re

INCOMPLETE_MARKER = ".incomplete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def mark_incomplete(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, INCOMPLETE_MARKER), "w") as f:
        f.flush()
        os.fsync(f.fileno())


def mark_complete(folder: str) -> None:
    os.remove(os.path.join(folder, INCOMPLETE_MARKER))
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "trainer_state.json")) and not os.path.exists(
        os.path.join(folder, INCOMPLETE_MARKER)
    )


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The highest-step `checkpoint-N` folder under `output_dir` whose save finished, or None."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        if match and is_complete(os.path.join(output_dir, name)):
            steps.append((int(match.group(1)), name))
    return os.path.join(output_dir, max(steps)[1]) if steps else None
