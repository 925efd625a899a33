"""One training run per `output_dir`: two runs writing one folder would overwrite each other's checkpoints and final
model without a word.

`VisualOPSDTrainer.train` takes an exclusive `flock` on `<output_dir>/_opsd_trl_run.lock` (main process only) and
writes who holds it (pid, host, start time, command line) into the file. The kernel drops the lock when its process
ends, however it ends (kill -9 included), so a killed run never blocks its resume; the file's stale text is simply
overwritten. The lock is held until the trainer is garbage-collected or the process exits (the final `save_model`
comes after `train()`); trainers of one process may share a folder (sequential runs of a script or notebook).
The leading `_` keeps the file out of `push_to_hub` uploads (transformers ignores `_*`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import warnings
import weakref

LOCK_FILE = "_opsd_trl_run.lock"
_held: dict[str, list[int]] = {}  # folder (real path) -> [fd, number of trainers of this process holding it]


def acquire(output_dir: str, owner) -> str | None:
    """Hold `output_dir` for this process while `owner` lives. None when held, else a message naming the holder."""
    folder = os.path.realpath(output_dir)
    if folder not in _held:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return _in_use_message(output_dir, path)
        except OSError as e:  # a file system without locks (some network mounts): run unguarded, and say so
            os.close(fd)
            warnings.warn(f"cannot lock output_dir {output_dir} ({e}); nothing stops a second run from writing "
                          "into it.", stacklevel=3)
            return None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        _held[folder] = [fd, 0]
    _held[folder][1] += 1
    weakref.finalize(owner, _release, folder)
    return None


def _release(folder: str) -> None:
    entry = _held.get(folder)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        os.close(entry[0])  # closing the descriptor drops the flock
        del _held[folder]


def _in_use_message(output_dir: str, path: str) -> str:
    try:
        with open(path) as f:
            info = json.load(f)
        holder = f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (OSError, ValueError, KeyError):
        holder = "its details are not written yet"
    return (f"output_dir {output_dir} is in use by another training run ({holder}); two runs in one output_dir "
            "overwrite each other's checkpoints and final model. Give this run another output_dir, or wait for that "
            f"run to end (a run that was killed holds no lock; {path} is only a record).")
