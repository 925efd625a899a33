"""`scripts/gpu_check.sh` at tiny size on CPU: every part runs (vLLM skipped when it does not import) and the report
has each part's time and peak memory and the extrapolation section, so the GPU check cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_part_at_tiny_size(tmp_path):
    out = tmp_path / "gpu_check"
    proc = subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh"), "--size", "tiny", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    results = report["results"]
    assert set(results) == {"train_qwen", "train_bagel", "loss", "bagel_teacher", "vllm_bagel"}
    assert all(r["ok"] for r in results.values())
    for name in ("train_qwen", "train_bagel"):
        assert results[name]["final"]["step"] == 2 and results[name]["peak_mb"] > 0
    assert [row["positions"] for row in results["bagel_teacher"]["rows"]] == [500, 1500, 4500]
    text = (out / "report.md").read_text()
    assert "## Extrapolation to the paper's run (8 GPUs)" in text and "ThinkMorph-7B recipe:" in text
