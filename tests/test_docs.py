"""The runnable examples in docs/ run as written and do what they say."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.S)


def test_trainer_doc_example_trains_and_prints_its_first_log(tmp_path, monkeypatch, capsys):
    blocks = _python_blocks("trainer.md")
    assert blocks, "docs/trainer.md has no python example"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}  # the blocks run in order in one namespace, as a reader would run them
    for code in blocks:
        exec(compile(code, "docs/trainer.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == trainer.args.max_steps == 2
    # The example's last line prints the first log entry's loss, KL and teacher time.
    printed = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    first_log = trainer.state.log_history[0]
    assert printed == {k: first_log[k] for k in ("loss", "kl_teacher_student", "time/teacher")}
    assert math.isfinite(printed["loss"]) and printed["loss"] > 0
    assert math.isfinite(printed["kl_teacher_student"]) and printed["time/teacher"] > 0


def test_architecture_package_map_lists_every_module():
    """docs/architecture.md's package map names every module of `opsd_trl/` and nothing that is gone."""
    package = DOCS.parent / "opsd_trl"
    text = (DOCS / "architecture.md").read_text()
    section = text[text.index("## Package map"):text.index("### Outside the package")]
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", section, flags=re.M))
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py")}
    assert sorted(modules - listed) == [], "modules missing from the package map"
    assert sorted(listed - modules) == [], "the package map lists modules that do not exist"
