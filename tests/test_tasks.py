"""Procedural tasks: determinism, exact scorers, rendered visual thoughts, splits, dataset layout, TSV import."""

import base64
import io
import itertools
import json
import random

import pytest
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from opsd_trl.tasks import FEATURES, jigsaw, load_vlmevalkit_tsv, make_dataset, maze, score, split_of

DELTA = {"L": (0, -1), "D": (1, 0), "R": (0, 1), "U": (-1, 0)}


def reference_simulate(grid, moves, rules):
    """An independent simulator written from the rules' definitions (VLMEvalKit VSP / gym FrozenLake)."""
    n = len(grid)
    pos = next((r, c) for r in range(n) for c in range(n) if grid[r][c] == "S")
    for m in moves:
        r, c = pos[0] + DELTA[m][0], pos[1] + DELTA[m][1]
        if not (0 <= r < n and 0 <= c < n):
            if rules == "vsp":
                return False
            r, c = pos  # gym: bumping into the border leaves the agent in place
        pos = (r, c)
        if grid[r][c] == "H":
            return False
        if grid[r][c] == "G" and rules == "gym":
            return True
    return grid[pos[0]][pos[1]] == "G"


def dot_cell(img, size, cell_px):
    """The cell whose centre pixel has the visual thought's position-dot colour (exactly one)."""
    cells = [(r, c) for r in range(size) for c in range(size)
             if img.getpixel((c * cell_px + cell_px // 2, r * cell_px + cell_px // 2)) == maze.DOT]
    assert len(cells) == 1, cells
    return cells[0]


mazes = st.builds(
    lambda seed, size, p: maze.generate(random.Random(seed), size, p),
    st.integers(0, 2**32), st.integers(2, 6), st.floats(0.0, 0.6),
)


# ---------------------------------------------------------------- maze


@settings(max_examples=60, deadline=None)
@given(mazes, st.sampled_from([14, 28, 32]))
def test_rendered_vt_path_solves_the_maze(drawn, cell_px):
    m, path = drawn
    vts = maze.render_vts(m, path, cell_px)
    assert len(vts) == len(path) >= 1
    cells = [m.start] + [dot_cell(v, m.size, cell_px) for v in vts]
    moves = "".join(next(k for k, d in DELTA.items() if (a[0] + d[0], a[1] + d[1]) == b)
                    for a, b in itertools.pairwise(cells))
    assert moves == path
    meta = json.dumps({"grid": list(m.grid)})
    for rules in ("vsp", "gym"):
        assert reference_simulate(m.grid, moves, rules)
        for fmt in maze.ANSWER_FORMATS:
            assert maze.score(meta, maze.format_answer(moves, fmt, m.start, m.size), rules=rules)
    # The cells format names, after each move, the cell the VT's dot marks (1..size*size, row by row).
    assert maze.format_answer(moves, "cells", m.start, m.size).split()[1::2] == [
        str(r * m.size + c + 1) for r, c in cells[1:]]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.floats(0.0, 0.5))
def test_bfs_is_the_lexicographically_smallest_shortest_path(seed, p):
    m, path = maze.generate(random.Random(seed), 3, p)
    for length in range(1, len(path) + 1):
        solutions = ["".join(s) for s in itertools.product("LDRU", repeat=length)
                     if reference_simulate(m.grid, s, "vsp")]
        assert bool(solutions) == (length == len(path))
    assert solutions[0] == path  # product() enumerates in L < D < R < U order


@settings(max_examples=200, deadline=None)
@given(mazes, st.text("LDRU", max_size=12), st.sampled_from(["vsp", "gym"]))
def test_random_moves_scored_like_direct_simulation(drawn, moves, rules):
    m, _ = drawn
    meta = json.dumps({"grid": list(m.grid), "rules": rules})
    expected = reference_simulate(m.grid, moves, rules)
    assert maze.simulate(m.grid, moves, rules) == expected
    if moves:  # the same moves in every output style the parser accepts
        for text in (" ".join(moves), maze.format_answer(moves, "numbered"), "\\boxed{" + ",".join(moves) + "}",
                     f"Let me think. Answer: {' -> '.join(moves)}", moves):
            assert score("maze", meta, text) == expected, text
    else:
        assert score("maze", meta, "") is False


def test_rules_differ_where_documented():
    grid = ["SFG", "FHF", "FFF"]
    assert maze.simulate(grid, "URR", "gym") and not maze.simulate(grid, "URR", "vsp")  # off-grid: stay vs fail
    assert maze.simulate(grid, "RRD", "gym") and not maze.simulate(grid, "RRD", "vsp")  # gym stops at the goal
    assert maze.simulate(grid, "RRDU", "vsp")  # VSP: only the final cell counts
    assert not maze.simulate(grid, "DR", "vsp") and not maze.simulate(grid, "DR", "gym")  # hole


@pytest.mark.parametrize("text,moves", [
    ("R D", "RD"), ("1 R 2 D", "RD"), ("1. R\n2. D", "RD"), ("RD", "RD"), ("right, down", "RD"),
    ("Step 1: R then step 2: D", "RD"), ("I think R. The answer is D R", "DR"), ("\\boxed{L, U}", "LU"),
    ("\x08oxed{L,U}", "LU"), ("Up we go: U. Final answer: R D. Check: D", "RD"), ("R D<|im_end|>", "RD"),
    ("no moves here", None), ("", None), ("DROP the UNDO", None),
])
def test_parse_moves(text, moves):
    assert maze.parse_moves(text) == moves


def test_maze_dataset_layout_and_sizes():
    ds = make_dataset("maze", "train", 20, size=4, cell_px=28, answer_format="numbered", seed=3)
    assert isinstance(ds, Dataset) and ds.features == FEATURES and len(ds) == 20
    assert len(set(ds["id"])) == 20
    for row in ds:
        meta = json.loads(row["meta"])
        assert row["task"] == "maze" and score("maze", row["meta"], row["answer"])
        assert row["answer"] == maze.format_answer(meta["path"], "numbered")
        parts = row["prompt"][0]["content"]
        assert row["prompt"][0]["role"] == "user" and [p["type"] for p in parts] == ["image", "text"]
        assert all(isinstance(im, Image.Image) and im.size == (112, 112) for im in row["images"] + row["vt_images"])
        assert len(row["images"]) == 1 and len(row["vt_images"]) == len(meta["path"]) >= 2
    short = make_dataset("maze", "train", 2, cell_px=14, prompt="short", seed=3)
    assert short[0]["prompt"][0]["content"][1]["text"] == "solve maze answer"
    assert short[0]["images"][0].size == (42, 42)


def test_determinism_by_seed():
    a, b = (make_dataset("maze", "train", 30, seed=7) for _ in range(2))
    assert a["meta"] == b["meta"] and a["answer"] == b["answer"] and a["id"] == b["id"]
    assert [im.tobytes() for r in a["vt_images"] for im in r] == [im.tobytes() for r in b["vt_images"] for im in r]
    assert make_dataset("maze", "train", 30, seed=8)["meta"] != a["meta"]
    j1, j2 = (make_dataset("jigsaw", "test", 5, seed=1) for _ in range(2))
    assert j1["meta"] == j2["meta"] and [r[0].tobytes() for r in j1["images"]] == [r[0].tobytes() for r in j2["images"]]


def reference_arrows(grid) -> set:
    """(row, col, move) for every move one step closer to the goal from every cell that can reach it: BFS from the
    goal over the non-hole cells, written independently of the package."""
    n = len(grid)
    goal = next((r, c) for r in range(n) for c in range(n) if grid[r][c] == "G")
    dist, frontier = {goal: 0}, [goal]
    while frontier:
        nxt = []
        for r, c in frontier:
            for dr, dc in DELTA.values():
                q = (r + dr, c + dc)
                if 0 <= q[0] < n and 0 <= q[1] < n and grid[q[0]][q[1]] != "H" and q not in dist:
                    dist[q] = dist[r, c] + 1
                    nxt.append(q)
        frontier = nxt
    return {(r, c, m) for (r, c), d in dist.items() if d > 0 for m, (dr, dc) in DELTA.items()
            if dist.get((r + dr, c + dc)) == d - 1}


def drawn_arrows(img, size, cell_px) -> set:
    """(row, col, move) wherever the pixel a third of a cell from the cell's centre toward that neighbour is the
    arrow colour."""
    return {(r, c, m) for r in range(size) for c in range(size) for m, (dr, dc) in DELTA.items()
            if img.getpixel((c * cell_px + cell_px // 2 + dc * cell_px // 3,
                             r * cell_px + cell_px // 2 + dr * cell_px // 3)) == maze.ARROW}


@settings(max_examples=60, deadline=None)
@given(mazes, st.sampled_from([28, 32]))
def test_policy_map_vt_draws_an_arrow_toward_every_shortest_way_neighbour(drawn, cell_px):
    m, _ = drawn
    img = maze.render_policy_map(m, cell_px)
    assert drawn_arrows(img, m.size, cell_px) == reference_arrows(m.grid)


def test_policy_map_rows_and_detour_answers():
    ds = make_dataset("maze", "train", 20, vts="policy_map", answer_format="numbered", seed=3)
    assert all(len(vts) == 1 for vts in ds["vt_images"])
    for row in ds:
        assert drawn_arrows(row["vt_images"][0], 3, 28) == reference_arrows(json.loads(row["meta"])["grid"])
    solved = 0
    for row in make_dataset("maze", "train", 60, answer_format="numbered", seed=4):
        meta = json.loads(row["meta"])
        detour = maze.detour_answer(meta, "numbered", random.Random(0))
        if detour is None:
            continue
        moves = maze.parse_moves(" ".join(detour))
        first = (r, c) = next((r, c) for r in range(3) for c in range(3) if meta["grid"][r][c] == "S")
        after = (r + DELTA[moves[0]][0], c + DELTA[moves[0]][1])
        on_route = {(r, c) for r, c, _ in reference_arrows(meta["grid"])}
        # the detour leaves every shortest way (no arrow of the start points there), to a cell that can still reach
        # the goal, and then takes a shortest way: two moves longer than the reference answer
        assert (first[0], first[1], moves[0]) not in reference_arrows(meta["grid"]) and after in on_route
        assert detour[0] == f"1 {moves[0]}" and len(moves) == len(meta["path"]) + 2
        assert reference_simulate(meta["grid"], moves, "vsp")
        solved += 1
    assert solved > 10


def grid_key(row):
    return "/".join(json.loads(row)["grid"])


def test_splits_are_disjoint_by_content():
    keys = {s: {grid_key(m) for m in make_dataset("maze", s, 400, seed=s == "test")["meta"]}
            for s in ("train", "validation", "test")}
    assert not (keys["train"] & keys["validation"] or keys["train"] & keys["test"] or keys["validation"] & keys["test"])
    assert all(split_of(k) == s for s, ks in keys.items() for k in ks)
    # jigsaw content (picture seed + shuffle) never crosses splits either
    train, test = (set(make_dataset("jigsaw", s, 50, piece_px=14)["meta"]) for s in ("train", "test"))
    assert len(train) == len(test) == 50 and not train & test


def test_dedupe_within_split():
    metas = make_dataset("maze", "test", 150, dedupe=True)["meta"]
    assert len({grid_key(m) for m in metas}) == 150
    with pytest.raises(ValueError, match="distinct"):  # only ~370 distinct 3x3 test mazes exist
        make_dataset("maze", "test", 400, dedupe=True)


# ---------------------------------------------------------------- jigsaw


def test_jigsaw_pieces_reassemble_and_scorer_is_exact():
    ds = make_dataset("jigsaw", "train", 4, rows=2, cols=3, piece_px=28, seed=2)
    for row in ds:
        order, problem, vts = json.loads(row["meta"])["order"], row["images"][0], row["vt_images"]
        assert problem.size == (84, 56) and len(vts) == 6 and all(v.size == (84, 56) for v in vts)
        slots = [problem.crop(((s % 3) * 28, (s // 3) * 28, (s % 3 + 1) * 28, (s // 3 + 1) * 28)) for s in range(6)]
        restored = jigsaw._assemble([slots[o - 1] for o in order], 2, 3, 28)
        assert restored.tobytes() == vts[-1].tobytes()  # the answer puts every piece back: the full picture
        assert sorted(order) == list(range(1, 7)) and order != list(range(1, 7))
        for perm in itertools.permutations(range(1, 7)):
            assert score("jigsaw", row["meta"], " ".join(map(str, perm))) == (list(perm) == order)
        assert score("jigsaw", row["meta"], f"Answer: [{', '.join(map(str, order))}]")
        assert score("jigsaw", row["meta"], "\\boxed{" + ",".join(map(str, order)) + "}")
        assert not score("jigsaw", row["meta"], " ".join(map(str, order[:-1])))
        assert not score("jigsaw", row["meta"], " ".join(map(str, order + [1])))


def test_jigsaw_partial_assemblies():
    row = make_dataset("jigsaw", "validation", 1, piece_px=14)[0]
    full = row["vt_images"][-1]
    for k, vt in enumerate(row["vt_images"], 1):
        for pos in range(4):
            box = ((pos % 2) * 14, (pos // 2) * 14, (pos % 2 + 1) * 14, (pos // 2 + 1) * 14)
            expected = full.crop(box) if pos < k else Image.new("RGB", (14, 14), jigsaw.EMPTY)
            assert vt.crop(box).tobytes() == expected.tobytes()


# ---------------------------------------------------------------- VLMEvalKit TSV


def _b64(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_load_vlmevalkit_tsv(tmp_path):
    grid = ["SFF", "FHF", "FFG"]
    img = maze.render(maze.Maze(tuple(grid)))
    other = Image.new("RGB", (10, 10), (255, 0, 0))
    rows = [  # columns of VSP_maze_task_main_original.tsv; maze_map as pandas writes a numpy array
        ("0", _b64(img), "Find the path. Put it in \\boxed{}.", "R,R,D,D", "['SFF' 'FHF' 'FFG']", 3),
        ("1", "0", "Same maze as row 0 <TEST-IMAGE> go.", "D,D,R,R", "['SFF', 'FHF', 'FFG']", 3),
        ("2", str([_b64(other), _b64(img)]), "Example <IMAGE-1> then task <TEST-IMAGE>", "", "['SFF','FHF','FFG']", 3),
    ]
    path = tmp_path / "VSP.tsv"
    path.write_text("index\timage\tquestion\tanswer\tmaze_map\tmaze_size\n"
                    + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    ds = load_vlmevalkit_tsv(path)
    assert ds.features == FEATURES and ds["id"] == ["vsp-0", "vsp-1", "vsp-2"]
    assert [len(r) for r in ds["images"]] == [1, 1, 2] and ds["vt_images"] == [[], [], []]
    assert ds[1]["images"][0].tobytes() == img.tobytes()  # image reused by index
    assert [p["type"] for p in ds[0]["prompt"][0]["content"]] == ["image", "text"]
    assert [p["type"] for p in ds[1]["prompt"][0]["content"]] == ["text", "image", "text"]
    assert [p["type"] for p in ds[2]["prompt"][0]["content"]] == ["text", "image", "text", "image"]
    assert ds[2]["images"][0].size == (10, 10) and ds[2]["images"][1].size == (84, 84)
    for row in ds:
        assert json.loads(row["meta"])["grid"] == grid and row["task"] == "maze"
        assert score("maze", row["meta"], "So the answer is \\boxed{R, R, D, D}")
        assert score("maze", row["meta"], "D D R R")
        assert not score("maze", row["meta"], "\\boxed{D,R,R,D}")  # through the hole
        assert not score("maze", row["meta"], "\\boxed{R,R,R,D,D}")  # off the grid fails under VSP rules


def test_images_survive_save_and_load(tmp_path):
    from datasets import load_from_disk

    ds = make_dataset("maze", "validation", 5, seed=4)
    ds.save_to_disk(tmp_path / "maze")
    back = load_from_disk(tmp_path / "maze")
    assert back.features == FEATURES and back["meta"] == ds["meta"]
    assert [im.tobytes() for r in back["vt_images"] for im in r] == [im.tobytes() for r in ds["vt_images"] for im in r]


def _fewest_more_moves(grid, prefix: str, limit: int = 8):
    """Brute force over move strings: the fewest moves that, appended to `prefix`, end on the goal without leaving
    the grid or touching a hole on the way (None when no string up to `limit` moves does; 3x3 needs at most 8)."""
    for n in range(limit + 1):
        for suffix in itertools.product("LDRU", repeat=n):
            moves = prefix + "".join(suffix)
            if _alive(grid, moves) and reference_simulate(grid, moves, "vsp"):
                return n
    return None


def _alive(grid, moves: str) -> bool:
    """The agent is still on the grid and not in a hole after `moves`."""
    r, c = next((i, row.index("S")) for i, row in enumerate(grid) if "S" in row)
    for move in moves:
        r, c = r + DELTA[move][0], c + DELTA[move][1]
        if not (0 <= r < len(grid) and 0 <= c < len(grid)) or grid[r][c] == "H":
            return False
    return True


mazes_3x3 = st.builds(lambda seed, p: maze.generate(random.Random(seed), 3, p), st.integers(0, 2**32),
                      st.floats(0.0, 0.6))


@settings(max_examples=25, deadline=None)
@given(mazes_3x3, st.text("LDRU", max_size=3))
def test_best_next_moves_are_the_brute_force_shortest_continuations(drawn, prefix):
    m, _ = drawn
    best = maze.best_next(m.grid, prefix)
    if not _alive(m.grid, prefix):
        assert best is None
        return
    need = _fewest_more_moves(m.grid, prefix)
    if need is None:
        assert best is None
    elif need == 0:
        assert best == {"stop"}
    else:
        assert best == {move for move in "LDRU" if _fewest_more_moves(m.grid, prefix + move) == need - 1}


def test_arithmetic_task_values_splits_and_scorer():
    from opsd_trl.tasks.arithmetic import parse_value

    train = make_dataset("arithmetic", "train", 200, seed=0, n_ops=3, ops="+-*")
    test = make_dataset("arithmetic", "test", 30, seed=0, n_ops=3, ops="+-*", dedupe=True)
    assert make_dataset("arithmetic", "train", 200, seed=0, n_ops=3, ops="+-*")["meta"] == train["meta"]
    exprs = lambda ds: {json.loads(m)["expression"] for m in ds["meta"]}  # noqa: E731
    assert not exprs(train) & exprs(test) and len(exprs(test)) == 30
    for row in list(train) + list(test):
        meta = json.loads(row["meta"])
        tokens = meta["expression"].split()
        value = int(tokens[0])  # an independent left-to-right evaluation of the expression text
        for op, b in zip(tokens[1::2], tokens[2::2], strict=True):
            value = {"+": value + int(b), "-": value - int(b), "*": value * int(b)}[op]
        assert meta["value"] == value == int(row["answer"])
        assert score("arithmetic", row["meta"], row["privileged_context"])  # the worked solution scores
        assert not score("arithmetic", row["meta"], f"Answer: {value + 1}")
        assert row["images"] == [] and isinstance(row["prompt"][0]["content"], str)
    assert parse_value("so \\boxed{-4} then 7") == -4 and parse_value("Answer is 12, since 3") == 12
    assert parse_value("it is 5 or 6") == 6 and parse_value("no number") is None
