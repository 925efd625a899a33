"""Multi-step arithmetic, a text task: the prompt asks for the value of an expression such as `23 + 15 - 7`; the
privileged context (SDFT's `privileged_context`, the teacher's only extra) is its worked solution, one step per
operation, left to right. Chat prompts with string content (text LMs' chat templates render them as they are).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from .common import DEFAULT_SPLIT_FRACTIONS, dump_meta, load_meta, split_seed, take_for_split

PROMPTS = {
    "full": "Compute {expr}. Work left to right. End with 'Answer: <number>'.",
    "short": "{expr} =",
}
_BOXED = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")
_AFTER_MARKER = re.compile(r"(?i)answer\s*(?:is\b|:|=)?\s*\**\s*(-?\d+)")
_INT = re.compile(r"-?\d+")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def parse_value(text: str) -> int | None:
    """The integer a completion commits to: the last `\\boxed{N}`, else the number after the last "answer" marker,
    else the last integer in the text; None when there is none."""
    for pattern in (_BOXED, _AFTER_MARKER, _INT):
        found = pattern.findall(text)
        if found:
            return int(found[-1])
    return None


def score(meta: str | dict, completion: str) -> bool:
    """Exact match of the parsed integer with the expression's value."""
    return parse_value(completion) == load_meta(meta)["value"]


def solve(operands: list[int], ops: list[str]) -> tuple[int, list[str]]:
    """The value (left to right, no precedence: what the prompt asks) and the worked steps."""
    value, steps = operands[0], []
    for op, b in zip(ops, operands[1:], strict=True):
        new = OPS[op](value, b)
        steps.append(f"{value} {op} {b} = {new}")
        value = new
    return value, steps


def expression(operands: list[int], ops: list[str]) -> str:
    return " ".join([str(operands[0])] + [f"{op} {b}" for op, b in zip(ops, operands[1:], strict=True)])


def _draws(seed: int, split: str, n_ops: int, max_operand: int, ops: str) -> Iterator[tuple[list[int], list[str]]]:
    rng = random.Random(split_seed(seed, split))
    while True:
        chosen = [rng.choice(ops) for _ in range(n_ops)]
        # Products stay small: a factor after "*" is a single digit.
        operands = [rng.randint(2, max_operand)] + [rng.randint(2, 9) if op == "*" else rng.randint(1, max_operand)
                                                    for op in chosen]
        yield operands, chosen


def make_rows(
    split: str,
    n: int,
    *,
    n_ops: int = 2,
    max_operand: int = 50,
    ops: str = "+-",
    seed: int = 0,
    prompt: str = "full",
    dedupe: bool = False,
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
) -> list[dict]:
    """n samples of `split`: `n_ops` operations drawn from `ops` ("+-*"), operands in [1, `max_operand`] (after
    "*": 2..9). The split of an expression is a hash of its text, the same whatever the dataset seed."""
    if n_ops < 1 or not ops or set(ops) - set(OPS):
        raise ValueError(f"arithmetic needs n_ops >= 1 and ops from {''.join(OPS)!r}; got n_ops={n_ops}, ops={ops!r}")
    kept = take_for_split(_draws(seed, split, n_ops, max_operand, ops), lambda d: expression(*d), split, n,
                          dedupe=dedupe, fractions=split_fractions, max_draws=max(1000, 50 * n))
    out = []
    for i, (operands, chosen) in enumerate(kept):
        expr = expression(operands, chosen)
        value, steps = solve(operands, chosen)
        out.append({
            "id": f"arith{n_ops}-{split}-s{seed}-{i:05d}",
            "prompt": [{"role": "user", "content": PROMPTS.get(prompt, prompt).format(expr=expr)}],
            "images": [],
            "vt_images": [],
            "answer": str(value),
            "task": "arithmetic",
            "meta": dump_meta({"expression": expr, "value": value}),
            "privileged_context": "Worked solution: " + "; ".join(steps) + f". Answer: {value}",
        })
    return out
