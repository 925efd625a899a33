"""What the teacher advises on the student's own prefixes: the quickstart's measure of the on-policy signal.

At every decision in a student's greedy answer (which move next; go on or stop after a move) the reference teacher
(the warm-start with the VTs) and the student each put their top token; a choice is right when it lies on a
shortest way to the goal from where the student's own moves so far have led (`opsd_trl.tasks.maze.best_next`).
Decisions are split by whether the student's prefix still follows the reference path, the one its VTs draw: off
that path the VTs show a route the student has left, which is where a teacher that reads its moves off the VTs
has the least to say.
"""

from __future__ import annotations

import torch

from ..eval import Contexts, completion_logits
from ..tasks.common import load_meta
from ..tasks.maze import MOVES, best_next

PARTS = ("on_path", "off_path")
MOVE_SET = set(MOVES)


def _choice(token: str, eos: str) -> str | None:
    """A token as a decision: a move letter, "stop" (EOS) or "continue" (a step number)."""
    if token in MOVE_SET:
        return token
    if token == eos:
        return "stop"
    return "continue" if token.isdigit() else None


def decisions(meta: dict, tokens: list[str], eos: str) -> list[tuple[int, str, set[str], bool]]:
    """The counted decisions of one answer (its tokens, EOS included): (position, kind: "move" or "stop_go", the right
    choices, whether the prefix still follows the reference path). A move slot asks which move; the slot after a move
    asks whether to go on (the first slot, before any move, is always "go on" and is not counted). A dead state (off
    the grid, in a hole) has no right answer."""
    out, moves = [], ""
    for i, token in enumerate(tokens):
        said = _choice(token, eos)
        best = best_next(meta["grid"], moves)
        right, kind = None, None
        if said in MOVE_SET:
            right, kind = (best if best not in (None, {"stop"}) else None), "move"
        elif said in ("stop", "continue") and moves:
            right, kind = (None if best is None else {"stop"} if best == {"stop"} else {"continue"}), "stop_go"
        if right is not None:
            out.append((i, kind, right, meta["path"].startswith(moves)))
        if said in MOVE_SET:
            moves += said
    return out


@torch.no_grad()
def teacher_advice(student, reference, contexts: Contexts, rows: list[dict], texts: list[str],
                   batch_size: int = 64) -> dict:
    """Counts per part (`on_path`, `off_path`): decisions, and how many the teacher's / the student's top token gets
    right, over the students' greedy answers `texts` (decoded, as in the predictions files) to `rows`."""
    tok = contexts.tokenizer
    eos = tok.eos_token
    counts = {p: {"decisions": 0, "teacher_right": 0, "student_right": 0} for p in PARTS}
    for start in range(0, len(rows), batch_size):
        batch, answers = rows[start : start + batch_size], texts[start : start + batch_size]
        ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in answers]
        t_logits, _ = completion_logits(reference, contexts, batch, ids, teacher=True)
        s_logits, _ = completion_logits(student, contexts, batch, ids, teacher=False)
        for row, seq, t_top, s_top in zip(batch, ids, t_logits.argmax(-1), s_logits.argmax(-1), strict=True):
            for i, _, right, on_path in decisions(load_meta(row["meta"]), tok.convert_ids_to_tokens(seq), eos):
                part = counts["on_path" if on_path else "off_path"]
                part["decisions"] += 1
                part["teacher_right"] += _choice(tok.convert_ids_to_tokens(int(t_top[i])), eos) in right
                part["student_right"] += _choice(tok.convert_ids_to_tokens(int(s_top[i])), eos) in right
    return counts


@torch.no_grad()
def decision_accuracy(model, contexts: Contexts, rows: list[dict], teacher: bool, seed: int = 0,
                      batch_size: int = 64) -> dict:
    """Teacher-forced on the reference answers of `rows`: at each move decision and each stop/go decision, whether the
    model's top token (in the teacher context of `contexts`, or the student context) is right. With the noise-VT
    control's contexts (`Contexts(noise_vt=True)`) this measures what the noised teacher still knows: a maze's VTs
    number its moves, so a teacher that sees the count can stop on time without seeing the route. `seed` fixes the
    noise draws. Returns {"move": {"decisions", "right"}, "stop_go": {...}}."""
    tok = contexts.tokenizer
    eos = tok.eos_token
    counts = {k: {"decisions": 0, "right": 0} for k in ("move", "stop_go")}
    torch.manual_seed(seed)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        ids = [tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in batch]
        top = completion_logits(model, contexts, batch, ids, teacher=teacher)[0].argmax(-1)
        for row, seq, row_top in zip(batch, ids, top, strict=True):
            for i, kind, right, _ in decisions(load_meta(row["meta"]), tok.convert_ids_to_tokens(seq), eos):
                counts[kind]["decisions"] += 1
                counts[kind]["right"] += _choice(tok.convert_ids_to_tokens(int(row_top[i])), eos) in right
    return counts
