"""FrozenLake-style maze: generator, BFS solver, renderer with visual thoughts, and an exact scorer.

Grid letters follow gym's FrozenLake: S start, F frozen (safe), H hole, G goal. Moves follow its action
order L0 D1 R2 U3. Rows grow downwards, so D is row + 1.
"""

from __future__ import annotations

import random
import re
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .common import (
    DEFAULT_SPLIT_FRACTIONS,
    dump_meta,
    extract_answer_tokens,
    load_meta,
    split_seed,
    take_for_split,
    user_prompt,
)

MOVES = "LDRU"  # gym FrozenLake-v1 action ids 0..3; also the BFS tie-break order
DELTAS = {"L": (0, -1), "D": (1, 0), "R": (0, 1), "U": (-1, 0)}
WORDS = {"left": "L", "down": "D", "right": "R", "up": "U"}
RULES = ("vsp", "gym")
ANSWER_FORMATS = ("plain", "numbered", "cells")
# What the VTs draw: "route" (VT k: the first k moves of the reference answer) or "policy_map" (one VT: from every
# cell that can reach the goal, an arrow toward each neighbour one step closer to it).
VT_KINDS = ("route", "policy_map")

# Colours chosen to stay distinct after resizing: each cell's content lives inside its own cell.
ICE, GRID_LINE = (205, 228, 245), (150, 175, 200)
HOLE, START, GOAL = (25, 45, 95), (40, 170, 70), (240, 190, 30)
PATH_OLD, PATH_NEW, DOT = (255, 150, 0), (220, 30, 30), (200, 0, 200)
ARROW = (230, 40, 20)

PROMPTS = {
    "full": (
        "The image shows a {size}x{size} frozen lake. The green square is the start, the gold diamond is the goal "
        "and the dark circles are holes. Find a path from the start to the goal that never steps into a hole or off "
        "the grid. Moves: L (left), D (down), R (right), U (up). Answer with the moves only, {hint}, e.g. {example}."
    ),
    "short": "solve maze answer",  # the word-level vocabulary of the CPU quickstart's tiny model
}
_HINTS = {"plain": "separated by spaces", "numbered": "each preceded by its step number",
          "cells": "each followed by the number of the cell it reaches (1 to size*size, row by row)"}

# A token is a word (any case) or a compact run of upper-case move letters ("R", "RRD").
_TOKEN = re.compile(r"(?<![A-Za-z])(?:(?i:left|down|right|up)|[LDRU]+)(?![A-Za-z])")


@dataclass(frozen=True)
class Maze:
    grid: tuple[str, ...]  # rows of "SFHG" letters

    @property
    def size(self) -> int:
        return len(self.grid)

    def find(self, letter: str) -> tuple[int, int]:
        for r, row in enumerate(self.grid):
            if letter in row:
                return r, row.index(letter)
        raise ValueError(f"maze has no {letter!r}: {self.grid}")

    @property
    def start(self) -> tuple[int, int]:
        return self.find("S")

    @property
    def goal(self) -> tuple[int, int]:
        return self.find("G")

    def key(self) -> str:
        """Content key for split assignment and dedupe: the layout itself."""
        return "/".join(self.grid)


# ---------------------------------------------------------------- generation and solving


def random_maze(rng: random.Random, size: int = 3, hole_prob: float = 0.3) -> Maze:
    """Start and goal on two distinct random cells; every other cell is a hole with probability hole_prob."""
    cells = size * size
    start, goal = rng.sample(range(cells), 2)
    letters = ["H" if rng.random() < hole_prob else "F" for _ in range(cells)]
    letters[start], letters[goal] = "S", "G"
    return Maze(tuple("".join(letters[r * size : (r + 1) * size]) for r in range(size)))


def _step(maze: Maze, cell: tuple[int, int], move: str) -> tuple[int, int] | None:
    r, c = cell[0] + DELTAS[move][0], cell[1] + DELTAS[move][1]
    return (r, c) if 0 <= r < maze.size and 0 <= c < maze.size else None


def distances_to_goal(maze: Maze) -> dict[tuple[int, int], int]:
    """Safe-move distance from every cell that can reach the goal (BFS from the goal; holes are walls)."""
    goal, dist = maze.goal, {maze.goal: 0}
    queue = deque([goal])
    while queue:
        cell = queue.popleft()
        for move in MOVES:
            nxt = _step(maze, cell, move)
            if nxt is not None and nxt not in dist and maze.grid[nxt[0]][nxt[1]] != "H":
                dist[nxt] = dist[cell] + 1
                queue.append(nxt)
    return dist


def shortest_path(maze: Maze, start: tuple[int, int] | None = None) -> str | None:
    """A shortest safe move string from S (or `start`) to G, or None if there is none.

    Tie-break: the lexicographically smallest string in L < D < R < U order among shortest paths (distances
    by BFS from the goal, then a greedy walk trying moves in that order).
    """
    goal, dist = maze.goal, distances_to_goal(maze)
    cell = maze.start if start is None else start
    if cell not in dist:
        return None
    path = []
    while cell != goal:
        for move in MOVES:
            nxt = _step(maze, cell, move)
            if nxt is not None and dist.get(nxt) == dist[cell] - 1:
                path.append(move)
                cell = nxt
                break
    return "".join(path)


def best_next(grid: Sequence[str], moves: str) -> set[str] | None:
    """After `moves` from the start, the next actions on a shortest way to the goal: the moves that bring the agent
    one step closer, or {"stop"} on the goal. None when `moves` left the grid, fell in a hole, or reached a cell
    with no way to the goal (VSP rules: walking on past the goal is allowed)."""
    maze = Maze(tuple(grid))
    dist, cell = distances_to_goal(maze), maze.start
    for move in moves:
        cell = _step(maze, cell, move)
        if cell is None or maze.grid[cell[0]][cell[1]] == "H":
            return None
    if cell not in dist:
        return None
    if dist[cell] == 0:
        return {"stop"}
    return _closer(maze, dist, cell)


def _closer(maze: Maze, dist: dict, cell: tuple[int, int]) -> set[str]:
    """The moves from `cell` to a neighbour one step closer to the goal (`dist`: `distances_to_goal`)."""
    return {m for m in MOVES if (nxt := _step(maze, cell, m)) is not None and dist.get(nxt) == dist[cell] - 1}


def policy_map(maze: Maze) -> dict[tuple[int, int], set[str]]:
    """What the policy-map VT draws: for every cell that can reach the goal (the goal itself excluded), the moves
    one step closer to it."""
    dist = distances_to_goal(maze)
    return {cell: _closer(maze, dist, cell) for cell, d in dist.items() if d > 0}


def detour_answer(meta: str | dict, answer_format: str, rng: random.Random) -> tuple[str, str] | None:
    """A reference answer that first takes one move away from the goal (to a cell that can still reach it), then a
    shortest way on, split as (the detour move's text, the rest): training on the rest only teaches a teacher to
    read its VTs from a state off the route. None when the start has no such move."""
    meta = load_meta(meta)
    maze = Maze(tuple(meta["grid"]))
    dist = distances_to_goal(maze)
    away = [m for m in MOVES if (nxt := _step(maze, maze.start, m)) is not None and nxt in dist
            and dist[nxt] > dist[maze.start]]
    if not away:
        return None
    move = rng.choice(away)
    moves = move + shortest_path(maze, _step(maze, maze.start, move))
    tokens = format_answer(moves, answer_format, maze.start, maze.size).split()
    first = 1 if answer_format == "plain" else 2  # the tokens of one move: "R", "1 R", "R 2"
    return " ".join(tokens[:first]), " ".join(tokens[first:])


def generate(
    rng: random.Random, size: int = 3, hole_prob: float = 0.3, min_path_len: int = 1, max_path_len: int | None = None
) -> tuple[Maze, str]:
    """Draw mazes until one is solvable with a shortest path length in [min_path_len, max_path_len]."""
    if not isinstance(size, int) or size < 2:
        raise ValueError(f"maze size must be an integer >= 2 (cells per side), got {size!r}")
    if not 0 <= hole_prob < 1:
        raise ValueError(f"hole_prob must be in [0, 1), got {hole_prob!r}")
    for _ in range(100_000):
        maze = random_maze(rng, size, hole_prob)
        path = shortest_path(maze)
        if path is not None and len(path) >= min_path_len and (max_path_len is None or len(path) <= max_path_len):
            return maze, path
    raise ValueError(
        f"no solvable {size}x{size} maze with path length in [{min_path_len}, {max_path_len}] "
        f"at hole_prob={hole_prob} after 100000 draws"
    )


def path_cells(start: tuple[int, int], moves: str) -> list[tuple[int, int]]:
    """Cells visited by following moves from start, without bounds checks (for drawing known-good paths)."""
    cells = [start]
    for m in moves:
        cells.append((cells[-1][0] + DELTAS[m][0], cells[-1][1] + DELTAS[m][1]))
    return cells


# ---------------------------------------------------------------- scoring


def simulate(grid: Sequence[str], moves: str, rules: str = "vsp") -> bool:
    """Whether executing `moves` on `grid` solves the maze.

    rules="vsp": VLMEvalKit's VSP_maze_task_main_original scorer. A move off the grid fails, a move into a
    hole fails, walking continues past the goal, and success means the final cell is the goal.
    rules="gym": gym FrozenLake-v1 with is_slippery=False. A move off the grid leaves the agent in place, the
    episode ends on a hole (fail) or on the goal (success; later moves are ignored).
    An empty move string never succeeds (start != goal).
    """
    if rules not in RULES:
        raise ValueError(f"rules must be one of {RULES}, got {rules!r}")
    maze = Maze(tuple(grid))
    cell, goal = maze.start, maze.goal
    for move in moves:
        nxt = _step(maze, cell, move)
        if nxt is None:
            if rules == "vsp":
                return False
            nxt = cell
        cell = nxt
        letter = maze.grid[cell[0]][cell[1]]
        if letter == "H":
            return False
        if letter == "G" and rules == "gym":
            return True
    return cell == goal


def parse_moves(text: str) -> str | None:
    """Extract the move string a completion commits to ("1 R 2 D", "R, D", "\\boxed{R,D}", "right down")."""
    tokens = extract_answer_tokens(text, _TOKEN)
    if tokens is None:
        return None
    return "".join(WORDS.get(t.lower(), t) for t in tokens)


def score(meta: str | dict, completion: str, rules: str | None = None) -> bool:
    """Exact scorer: parse the completion's moves and simulate them on the maze in `meta`."""
    meta = load_meta(meta)
    moves = parse_moves(completion)
    return moves is not None and simulate(meta["grid"], moves, rules or meta.get("rules", "vsp"))


def format_answer(moves: str, answer_format: str = "plain", start: tuple[int, int] = (0, 0), size: int = 3) -> str:
    """The reference answer text. `cells`: after each move the cell it reaches, numbered 1..size*size row by row
    ("R 2 D 5" from the top-left corner of a 3x3 maze): an intermediate step the newest VT's dot shows."""
    if answer_format == "plain":
        return " ".join(moves)
    if answer_format == "numbered":
        return " ".join(f"{i} {m}" for i, m in enumerate(moves, 1))
    if answer_format == "cells":
        cells = path_cells(start, moves)[1:]
        return " ".join(f"{m} {r * size + c + 1}" for m, (r, c) in zip(moves, cells, strict=True))
    raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")


def question(size: int, prompt: str = "full", answer_format: str = "plain") -> str:
    """The question text: a preset name from PROMPTS or a custom template with {size}, {hint}, {example}."""
    template = PROMPTS.get(prompt, prompt)
    return template.format(size=size, hint=_HINTS[answer_format], example=format_answer("RD", answer_format,
                                                                                         size=size))


# ---------------------------------------------------------------- rendering


def _center(cell: tuple[int, int], px: int) -> tuple[int, int]:
    return cell[1] * px + px // 2, cell[0] * px + px // 2


def render(maze: Maze, cell_px: int = 28) -> Image.Image:
    """The problem image: (size * cell_px) square; with 28 px cells, patch 14 and merge 2 give one token per cell."""
    n = maze.size
    img = Image.new("RGB", (n * cell_px, n * cell_px), ICE)
    draw = ImageDraw.Draw(img)
    pad = max(1, cell_px // 6)
    for r, row in enumerate(maze.grid):
        for c, letter in enumerate(row):
            x0, y0, x1, y1 = c * cell_px, r * cell_px, (c + 1) * cell_px - 1, (r + 1) * cell_px - 1
            draw.rectangle((x0, y0, x1, y1), outline=GRID_LINE)
            inner = (x0 + pad, y0 + pad, x1 - pad, y1 - pad)
            if letter == "H":
                draw.ellipse(inner, fill=HOLE)
            elif letter == "S":
                draw.rectangle(inner, fill=START)
            elif letter == "G":
                cx, cy = _center((r, c), cell_px)
                h = cell_px // 2 - pad
                draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=GOAL)
    return img


def render_vts(maze: Maze, moves: str, cell_px: int = 28, base: Image.Image | None = None) -> list[Image.Image]:
    """Visual thoughts: image k (1..len(moves)) draws the first k path segments on the problem image.

    Older segments in PATH_OLD, the newest in PATH_NEW, and a DOT on the position reached after k moves.
    """
    base = base if base is not None else render(maze, cell_px)
    centers = [_center(cell, cell_px) for cell in path_cells(maze.start, moves)]
    width, radius = max(2, cell_px // 7), max(2, cell_px // 5)
    vts = []
    for k in range(1, len(moves) + 1):
        img = base.copy()
        draw = ImageDraw.Draw(img)
        for i in range(k):
            draw.line([centers[i], centers[i + 1]], fill=PATH_NEW if i == k - 1 else PATH_OLD, width=width)
        x, y = centers[k]
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=DOT)
        vts.append(img)
    return vts


def render_policy_map(maze: Maze, cell_px: int = 28, base: Image.Image | None = None) -> Image.Image:
    """The policy-map VT: the problem image with, from the centre of every cell that can reach the goal, an ARROW
    toward each neighbour one step closer (`policy_map`). Unlike the route VTs it shows the best move from every
    state the student can reach, not only along the reference route."""
    img = (base if base is not None else render(maze, cell_px)).copy()
    draw = ImageDraw.Draw(img)
    width, reach, head = max(1, cell_px // 10), cell_px * 9 // 20, max(2, cell_px // 6)
    for cell, moves in policy_map(maze).items():
        x, y = _center(cell, cell_px)
        for move in moves:
            dr, dc = DELTAS[move]
            tip = (x + dc * reach, y + dr * reach)
            draw.line([(x, y), tip], fill=ARROW, width=width)
            back = (tip[0] - dc * head, tip[1] - dr * head)  # the head: a triangle pointing at the neighbour
            draw.polygon([tip, (back[0] + dr * head, back[1] + dc * head), (back[0] - dr * head, back[1] - dc * head)],
                         fill=ARROW)
    return img


# ---------------------------------------------------------------- dataset rows


def _draws(seed: int, split: str, size: int, hole_prob: float, min_path_len: int, max_path_len) -> Iterator:
    rng = random.Random(split_seed(seed, split))
    while True:
        yield generate(rng, size, hole_prob, min_path_len, max_path_len)


def make_rows(
    split: str,
    n: int,
    *,
    size: int = 3,
    hole_prob: float = 0.3,
    min_path_len: int = 2,
    max_path_len: int | None = None,
    seed: int = 0,
    cell_px: int = 28,
    answer_format: str = "plain",
    prompt: str = "full",
    rules: str = "vsp",
    vts: str = "route",
    dedupe: bool = False,
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
) -> list[dict]:
    """n samples of `split` in the standard layout (rows for `common.to_dataset`); `vts`: one of VT_KINDS."""
    if answer_format not in ANSWER_FORMATS or rules not in RULES or vts not in VT_KINDS:
        raise ValueError(f"answer_format in {ANSWER_FORMATS}, rules in {RULES}, vts in {VT_KINDS}; got "
                         f"{answer_format!r}, {rules!r}, {vts!r}")
    draws = _draws(seed, split, size, hole_prob, min_path_len, max_path_len)
    kept = take_for_split(
        draws, lambda d: d[0].key(), split, n, dedupe=dedupe, fractions=split_fractions, max_draws=max(1000, 50 * n)
    )
    text = question(size, prompt, answer_format)
    rows = []
    for i, (maze, moves) in enumerate(kept):
        image = render(maze, cell_px)
        rows.append(
            {
                "id": f"maze{size}-{split}-s{seed}-{i:05d}",
                "prompt": user_prompt(1, text),
                "images": [image],
                "vt_images": (render_vts(maze, moves, cell_px, base=image) if vts == "route"
                              else [render_policy_map(maze, cell_px, base=image)]),
                "answer": format_answer(moves, answer_format, maze.start, maze.size),
                "task": "maze",
                "meta": dump_meta({"grid": list(maze.grid), "rules": rules, "path": moves}),
            }
        )
    return rows
