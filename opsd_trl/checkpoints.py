"""Atomic checkpoints: a checkpoint folder counts only once everything in it (model, optimizer, scheduler, RNG,
trainer state, teacher shadow on every rank) is on disk.

A marker file is created before the first byte is written and removed (one atomic unlink) after all ranks have
finished; resume skips any folder that still holds it, so a run killed mid-save resumes from the previous one.
Also the trainer's own part of a checkpoint: the teacher shadow file of each rank, and which folder a resume reads.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil

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


def check_safetensors(path: str) -> None:
    """Raise naming `path` when a `.safetensors` file is shorter than its header says (a copy, download or save cut
    short); safetensors' own error names no file. Reads the header only."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 8 + n <= size else None
        needed = 8 + n + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, AttributeError):
        needed = None
    if needed is None or size < needed:
        raise ValueError(
            f"{path} is truncated or not a safetensors file ({size} bytes"
            + (f", its header needs {needed}" if needed else "") + "): a copy, download or save was cut short. "
            "Copy or download it again; for a checkpoint, resume from an earlier complete one."
        )


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
    check_safetensors(path)
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
            # The run's output_dir itself (its newest checkpoint), else a sibling of an interrupted checkpoint.
            previous = last_complete_checkpoint(resume_from_checkpoint) or last_complete_checkpoint(
                os.path.dirname(resume_from_checkpoint.rstrip("/")))
            raise ValueError(
                f"{resume_from_checkpoint} is not a complete checkpoint (its save was interrupted, or it has no "
                "trainer_state.json); "
                + (f"resume from {previous} instead." if previous else "no complete checkpoint is next to it.")
            )
    return resume_from_checkpoint


# --- settings a resume restores from the checkpoint -------------------------------------------------------------
RESUME_ARGS_FILE = "visual_opsd_resume.json"
# Restored from the checkpoint (optimizer and scheduler state, teacher shadow, RNG, data order), so a new value
# would be ignored (learning_rate, betas, ...) or misread (an EMA shadow served as the "fixed" teacher): refused.
RESTORED_FIELDS = ("teacher_mode", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                   "optim", "lr_scheduler_type", "seed", "per_device_train_batch_size", "gradient_accumulation_steps")


def resume_settings(args, num_processes: int, train_rows: int | None) -> dict:
    values = args.to_dict()  # enums as their values, as JSON keeps them
    return {**{k: values[k] for k in RESTORED_FIELDS}, "num_processes": num_processes, "train_rows": train_rows}


def save_resume_settings(folder: str, settings: dict) -> None:
    with open(os.path.join(folder, RESUME_ARGS_FILE), "w") as f:
        json.dump(settings, f, indent=1)


def check_resume_settings(folder: str, settings: dict) -> None:
    """Refuse a resume whose restored settings differ from the checkpoint's, naming each (a checkpoint written
    before this file existed is not checked)."""
    path = os.path.join(folder, RESUME_ARGS_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = json.load(f)
    changed = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in settings.items() if k in saved and saved[k] != v]
    if changed:
        raise ValueError(
            f"resume_from_checkpoint {folder} was written with other settings ({'; '.join(changed)}); a resume "
            "restores them from the checkpoint (optimizer, scheduler, teacher shadow, data order), so the new values "
            "would be ignored or misread. Resume with the checkpoint's values, or start a new run from its weights "
            "(model_name_or_path set to the checkpoint folder, no resume_from_checkpoint, another output_dir)."
        )


# --- a write that failed for lack of room ---------------------------------------------------------------------
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_ROOM_TEXT = ("unexpected pos", "file write failed", "No space left", "File too large", "Disk quota")


def is_out_of_room(error: BaseException) -> bool:
    """A write that failed because the disk (or a quota / file-size limit) is full; torch's zip writer reports it
    only as `unexpected pos`."""
    return (isinstance(error, OSError) and error.errno in _NO_ROOM) or any(t in str(error) for t in _NO_ROOM_TEXT)


def out_of_room_error(folder: str, error: BaseException) -> OSError:
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(folder))).free
    previous = last_complete_checkpoint(os.path.dirname(os.path.abspath(folder)))
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return OSError(
        f"writing checkpoint {folder} failed: no space left on its disk ({free / 2**20:.0f} MiB free) or a "
        f"file-size / quota limit ({first}). Free space or give output_dir on a larger disk, then resume with "
        "resume_from_checkpoint: true, which skips this incomplete checkpoint and continues from "
        + (f"{previous}." if previous else "the last complete one (none yet: start again).")
    )
