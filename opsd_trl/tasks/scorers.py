"""Scorers by name, for evaluation on any dataset: a procedural task's exact scorer (`maze`, `jigsaw`), `exact_match`,
`multiple_choice` (a letter), or a user's `module:function`.

A scorer reads one dataset row and the decoded completion: `score(row, completion) -> bool`, and `parse(completion)`
returns what the completion commits to (written beside it in the predictions), or None.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Scorer:
    name: str
    score: Callable[[dict, str], bool]
    parse: Callable[[str], object] = lambda completion: None


def normalize(text: str) -> str:
    """Case-folded, whitespace-collapsed text, without surrounding spaces and final punctuation."""
    return " ".join(str(text).split()).casefold().rstrip(".!")


def exact_match(row: dict, completion: str) -> bool:
    """The completion, normalized, equals the row's `answer`, normalized."""
    return normalize(completion) == normalize(row["answer"])


_LETTER = re.compile(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z])")


def choice_letter(completion: str) -> str | None:
    """The first standalone capital letter of the completion (`B`, `(B)`, `B.`, `Answer: B`), or None."""
    match = _LETTER.search(completion)
    return match.group(1) if match else None


def multiple_choice(row: dict, completion: str) -> bool:
    """The completion's first standalone capital letter is the row's `answer` letter."""
    return choice_letter(completion) == choice_letter(str(row["answer"]).strip().upper())


BUILTIN = {
    "exact_match": Scorer("exact_match", exact_match, normalize),
    "multiple_choice": Scorer("multiple_choice", multiple_choice, choice_letter),
}


def get_scorer(name: str) -> Scorer:
    """A scorer by name: a task of `opsd_trl.tasks.TASKS`, a name of `BUILTIN`, or `module:function` (a
    `function(row, completion) -> bool` importable from `module`)."""
    from . import TASKS

    if name in TASKS:
        _, score, parse = TASKS[name]
        return Scorer(name, lambda row, completion: score(row["meta"], completion), parse)
    if name in BUILTIN:
        return BUILTIN[name]
    module, _, function = name.partition(":")
    if module and function:
        try:
            fn = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"scorer {name!r} cannot be imported ({e}); give module:function of a function "
                             "(row, completion) -> bool that Python can import (PYTHONPATH).") from e
        return Scorer(name, fn)
    raise ValueError(f"unknown scorer {name!r}; use a task ({', '.join(sorted(TASKS))}), "
                     f"{', '.join(BUILTIN)}, or module:function.")
