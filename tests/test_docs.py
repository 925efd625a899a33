"""The runnable examples in docs/ run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.S)


@pytest.mark.parametrize("name", ["trainer.md"])
def test_doc_example_runs(name, tmp_path, monkeypatch, capsys):
    blocks = _python_blocks(name)
    assert blocks, f"{name} has no python example"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, f"docs/{name}", "exec"), {"__name__": "__docs__"})
    assert "loss" in capsys.readouterr().out
