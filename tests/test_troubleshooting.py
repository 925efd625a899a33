"""docs/troubleshooting.md mentions every error message the package raises.

For each `raise X("...")` in `opsd_trl/**/*.py` the message's first few literal words (variable parts of an
f-string become wildcards, as `<...>` in the page) must appear in the page. Messages held in a variable are resolved
when the variable is a string assigned in the same function or module; a re-raised exception (`raise`, `raise e`)
or a bare exception class has no message of its own and is skipped. The problems `opsd-trl verify-vt-cache` prints
are checked the same way.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "opsd_trl"
PAGE = ROOT / "docs" / "troubleshooting.md"
PRINTED = PACKAGE / "vt_cache" / "verify.py"  # its problem strings are printed by `opsd-trl verify-vt-cache`

N_WORDS = 5  # literal words (with a letter or digit) compared per message
WILDCARD = r"[^|]{0,120}?"  # a variable part (within one table cell); the page writes it <...>

# Messages that are not user-facing errors, by the start of their literal text, with the reason.
IGNORE = {
    "module 'opsd_trl' has no attribute": "Python's standard AttributeError from the lazy module __getattr__",
    "module 'opsd_trl.quickstart' has no attribute": "the same, from the quickstart package's lazy __getattr__",
}

Segments = list  # str: literal text; None: a variable part


def _segments(node: ast.AST, scope: dict[str, ast.AST], depth: int = 0) -> Segments | None:
    """The message expression as literal / variable parts; None when it is not a (resolvable) string."""
    if depth > 3:
        return None
    if isinstance(node, ast.Constant):
        return [node.value] if isinstance(node.value, str) else None
    if isinstance(node, ast.JoinedStr):
        return [v.value if isinstance(v, ast.Constant) else None for v in node.values]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left = _segments(node.left, scope, depth + 1)
        if left is None:
            return None
        return left + (_segments(node.right, scope, depth + 1) or [None])
    if isinstance(node, ast.Name) and node.id in scope:
        return _segments(scope[node.id], scope, depth + 1)
    return None


def _assignments(body) -> dict[str, ast.AST]:
    out = {}
    for node in body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = node.value
    return out


def _messages(path: Path) -> list[tuple[str, Segments]]:
    """(`file:line`, segments) for every raise with a string message in `path` (and verify's printed problems)."""
    tree = ast.parse(path.read_text())
    module_scope = _assignments(tree.body)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def scope_of(node):
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                return {**module_scope, **_assignments(ast.walk(node))}
        return module_scope

    found = []
    for node in ast.walk(tree):
        message = None
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
            message = node.exc.args[0]
        elif path == PRINTED and isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "append" and getattr(node.func.value, "id", None) == "problems" and node.args:
                message = node.args[0]
        elif path == PRINTED and isinstance(node, ast.List) and len(node.elts) == 1:
            message = node.elts[0]
        if message is None:
            continue
        segments = _segments(message, scope_of(node))
        if segments is not None:
            found.append((f"{path.relative_to(ROOT)}:{node.lineno}", segments))
    return found


def _literal(segments: Segments) -> str:
    return "".join(s if s is not None else "<...>" for s in segments)


def _pattern(segments: Segments) -> tuple[str, int]:
    """Regex over the first N_WORDS literal words (backticks dropped, as the page's normaliser does)."""
    parts, words = [], 0
    for seg in segments:
        if seg is None:
            if not parts or parts[-1] != WILDCARD:
                parts.append(WILDCARD)
            continue
        for token in re.split(r"(\s+)", seg.replace("`", "")):
            if not token:
                continue
            if token.isspace():
                parts.append(r"\s+")
                continue
            parts.append(re.escape(token))
            words += bool(re.search(r"[A-Za-z0-9]", token))
            if words == N_WORDS:
                return "".join(parts), words
    while parts and parts[-1] in (WILDCARD, r"\s+"):
        parts.pop()
    return "".join(parts), words


def _page_text() -> str:
    text = PAGE.read_text().replace("`", "").replace("\\|", "|")
    return re.sub(r"\s+", " ", text)


def _all_messages() -> list[tuple[str, Segments]]:
    return [m for path in sorted(PACKAGE.rglob("*.py")) for m in _messages(path)]


def _ignored(segments: Segments) -> bool:
    return any(_literal(segments).startswith(prefix) for prefix in IGNORE)


def test_messages_are_found():
    messages = _all_messages()
    assert len(messages) > 80, f"only {len(messages)} raised messages found: is the extraction broken?"
    for prefix in IGNORE:  # a stale ignore entry would hide nothing but should go
        assert any(_literal(s).startswith(prefix) for _, s in messages), f"IGNORE entry {prefix!r} matches nothing"


@pytest.mark.parametrize("where,segments", _all_messages(), ids=lambda v: v if isinstance(v, str) else "")
def test_message_is_documented(where, segments):
    if _ignored(segments):
        pytest.skip("internal message (IGNORE)")
    pattern, words = _pattern(segments)
    assert words >= 1, f"{where}: message {_literal(segments)!r} has no literal words to look for; add it to IGNORE"
    assert re.search(pattern, _page_text()), (
        f"{where}: the message {_literal(segments)!r} is not in docs/troubleshooting.md "
        f"(looked for /{pattern}/); add a row: the message with <...> for variable parts, the cause, the fix"
    )
