"""Atomic checkpoints: a checkpoint folder counts only once everything in it (model, optimizer, scheduler, RNG,
trainer state, teacher shadow on every rank) is on disk.

A marker file is created before the first byte is written and removed (one atomic unlink) after all ranks have
finished; resume skips any folder that still holds it, so a run killed mid-save resumes from the previous one.
Also the trainer's own part of a checkpoint: the teacher shadow file of each rank, and which folder a resume reads.
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


# --- what VisualOPSDTrainer adds to a checkpoint, and how it resumes -------------------------------------------
SHADOW_FILE = "teacher_shadow_rank{rank}.safetensors"  # EMA / fixed teacher weights, one file per rank


def shadow_path(folder: str, rank: int) -> str:
    return os.path.join(folder, SHADOW_FILE.format(rank=rank))


def load_shadow(shadow, folder: str, rank: int) -> None:
    """Load this rank's teacher shadow (`ShadowWeights`) from a checkpoint folder."""
    path = shadow_path(folder, rank)
    if not os.path.isfile(path):
        raise ValueError(
            f"{folder} has no teacher shadow for rank {rank} ({os.path.basename(path)}): it was saved with another "
            "teacher_mode or number of processes. Resume with the same teacher_mode and process count."
        )
    shadow.load(path)


def resolve_resume(resume_from_checkpoint, output_dir: str):
    """`train(resume_from_checkpoint=...)`: True means the last *complete* checkpoint of `output_dir` (not merely
    the last folder); a path must be a complete checkpoint. Returns the folder, or the argument unchanged."""
    if resume_from_checkpoint is True:
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise ValueError(
                f"no complete checkpoint in {output_dir} to resume from; start without "
                "resume_from_checkpoint or point output_dir at the run to continue."
            )
        return found
    if isinstance(resume_from_checkpoint, str):
        if not os.path.isdir(resume_from_checkpoint):
            raise ValueError(f"resume_from_checkpoint {resume_from_checkpoint} is not a folder.")
        if not is_complete(resume_from_checkpoint):
            previous = last_complete_checkpoint(os.path.dirname(resume_from_checkpoint.rstrip("/")))
            raise ValueError(
                f"{resume_from_checkpoint} is not a complete checkpoint (its save was interrupted, or it has no "
                "trainer_state.json); "
                + (f"resume from {previous} instead." if previous else "no complete checkpoint is next to it.")
            )
    return resume_from_checkpoint
