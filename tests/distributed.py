"""Harness for distributed tests: run a script under ``accelerate launch`` on 2 CPU processes, read its JSON.

A launched script (under ``tests/scripts/``) takes ``--out PATH`` as its first option and writes one JSON object
there from the main process; it builds its Accelerator with ``InitProcessGroupKwargs(backend="gloo")`` and calls
``torch.distributed.destroy_process_group()`` before exiting (see docs/development.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "accelerate_configs"
SCRIPTS = Path(__file__).resolve().parent / "scripts"


def _free_port() -> int:
    # Several test runs may share this machine; a fixed rendezvous port (29500) would collide.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolve(path: str | os.PathLike, folder: Path, suffix: str) -> Path:
    """Accept a full path or a bare name (``"zero3_step"``, ``"cpu_zero3"``) relative to ``folder``."""
    p = Path(path)
    if not p.exists():
        p = folder / (p.name if p.suffix else p.name + suffix)
    if not p.exists():
        raise FileNotFoundError(path)
    return p


def launch_env(config_file: str | os.PathLike | None = None) -> dict[str, str]:
    """Environment of the launched processes: 1 thread each (2 processes share 2 cores), offline, repo importable.

    For a DDP config on CPU (``distributed_type: MULTI_GPU`` + ``use_cpu: true``, see cpu_ddp.yaml) it also sets
    ``ACCELERATE_USE_CPU=true``: accelerate's multi-process launcher does not pass use_cpu on, and without it the
    Accelerator on a GPU-less machine silently runs each process as a separate single-process job.
    """
    env = dict(os.environ)
    if config_file is not None:
        config = yaml.safe_load(Path(config_file).read_text())
        if config.get("use_cpu") and config.get("distributed_type") == "MULTI_GPU":
            env["ACCELERATE_USE_CPU"] = "true"
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    return env


def launch(
    script_path: str | os.PathLike,
    config_file: str | os.PathLike,
    args: list[str] | tuple[str, ...] = (),
    tmp_path: str | os.PathLike | None = None,
    timeout: float = 600,
    num_processes: int = 2,
) -> dict:
    """Run ``accelerate launch --config_file CONFIG --num_processes N SCRIPT --out JSON ARGS`` and return the JSON.

    ``script_path`` / ``config_file`` may be bare names of files in ``tests/scripts`` / ``accelerate_configs``.
    Raises ``RuntimeError`` with the combined output when the launch fails, times out or writes no JSON.
    """
    script = _resolve(script_path, SCRIPTS, ".py")
    config = _resolve(config_file, CONFIGS, ".yaml")
    out_dir = Path(tmp_path) if tmp_path is not None else Path.cwd()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{script.stem}.{config.stem}.json"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config),
        "--num_processes", str(num_processes),
        "--main_process_port", str(_free_port()),
        str(script), "--out", str(out), *map(str, args),
    ]  # fmt: skip
    # A new session for the launcher; its workers get sessions of their own (torch's elastic agent starts them so),
    # so a timeout kills the launcher's group and each process under it.
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=launch_env(config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        workers = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in workers:  # a surviving worker would hold the output pipe open: communicate() would never return
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        output, _ = proc.communicate(timeout=60)
        raise RuntimeError(f"timed out after {timeout} s: {' '.join(cmd)}\n{_tail(output)}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"exit code {proc.returncode}: {' '.join(cmd)}\n{_tail(output)}")
    if not out.exists():
        raise RuntimeError(f"{script.name} wrote no result to {out}\n{_tail(output)}")
    result = json.loads(out.read_text())
    result.setdefault("_output", output)
    return result


def _descendants(pid: int) -> list[int]:
    """The processes under `pid` (children, their children, ...), from /proc; empty where there is none."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except (OSError, IndexError):
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _tail(text: str, n: int = 12000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


def load_script(script_path: str | os.PathLike):
    """Import a launched script as a module, to reuse its batch / loss code for a single-process reference."""
    script = _resolve(script_path, SCRIPTS, ".py")
    spec = importlib.util.spec_from_file_location(f"_launched_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
