"""Jigsaw: a procedurally drawn picture cut into rows x cols pieces and shuffled; the answer restores the order.

The problem image shows the shuffled pieces in a grid the size of the picture. Pieces are numbered 1..K in
reading order of that image. The answer lists, for each position of the original picture in reading order,
the number of the piece that belongs there. Visual thoughts are partial assemblies: VT k has the first k
positions filled with their correct pieces, the rest grey.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

import numpy as np
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

EMPTY = (128, 128, 128)
PROMPTS = {
    "full": (
        "The image shows a picture cut into {rows}x{cols} pieces that were shuffled. The pieces are numbered 1 to "
        "{k} in reading order (left to right, top to bottom) as they appear in the image. Restore the picture: for "
        "each position of the original picture in reading order, give the number of the piece that belongs there, "
        "separated by spaces, e.g. {example}."
    ),
    "short": "solve jigsaw answer",
}
_TOKEN = re.compile(r"(?<!\d)\d+(?!\d)")


def draw_picture(rng: random.Random, width: int, height: int) -> Image.Image:
    """A random picture with structure across piece borders: a colour gradient plus overlapping shapes."""
    c0, c1 = np.array([rng.randrange(256) for _ in range(3)]), np.array([rng.randrange(256) for _ in range(3)])
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width]
    t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height + 1) / 2  # in [0, 1], direction random
    pixels = c0 + (c1 - c0) * np.clip(t, 0, 1)[..., None]
    img = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(4, 8)):
        colour = tuple(rng.randrange(256) for _ in range(3))
        x0, x1 = sorted(rng.uniform(-0.2, 1.2) * width for _ in range(2))
        y0, y1 = sorted(rng.uniform(-0.2, 1.2) * height for _ in range(2))
        kind = rng.choice(("ellipse", "rectangle", "line", "triangle"))
        if kind == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == "line":
            draw.line((x0, y0, x1, y1), fill=colour, width=max(2, min(width, height) // 12))
        else:
            draw.polygon([(x0, y1), (x1, y1), (rng.uniform(x0, x1), y0)], fill=colour)
    return img


def _tiles(img: Image.Image, rows: int, cols: int, piece_px: int) -> list[Image.Image]:
    return [
        img.crop((c * piece_px, r * piece_px, (c + 1) * piece_px, (r + 1) * piece_px))
        for r in range(rows)
        for c in range(cols)
    ]


def _assemble(tiles: list[Image.Image | None], rows: int, cols: int, piece_px: int) -> Image.Image:
    img = Image.new("RGB", (cols * piece_px, rows * piece_px), EMPTY)
    for i, tile in enumerate(tiles):
        if tile is not None:
            img.paste(tile, ((i % cols) * piece_px, (i // cols) * piece_px))
    return img


def random_perm(rng: random.Random, k: int) -> list[int]:
    """perm[slot] = original position shown in that slot; never the identity (nothing to solve)."""
    while True:
        perm = list(range(k))
        rng.shuffle(perm)
        if perm != list(range(k)):
            return perm


def answer_order(perm: list[int]) -> list[int]:
    """For each original position, the 1-based slot holding its piece (the inverse permutation)."""
    order = [0] * len(perm)
    for slot, pos in enumerate(perm):
        order[pos] = slot + 1
    return order


def render(picture: Image.Image, perm: list[int], rows: int, cols: int, piece_px: int):
    """(problem image, VT images): the shuffled pieces, and partial assemblies k = 1..K."""
    tiles = _tiles(picture, rows, cols, piece_px)
    problem = _assemble([tiles[p] for p in perm], rows, cols, piece_px)
    k_all = rows * cols
    vts = [_assemble(tiles[:k] + [None] * (k_all - k), rows, cols, piece_px) for k in range(1, k_all + 1)]
    return problem, vts


def parse_order(text: str) -> list[int] | None:
    """Extract the piece numbers a completion commits to ("3 1 4 2", "[3, 1, 4, 2]", "\\boxed{3,1,4,2}")."""
    tokens = extract_answer_tokens(text, _TOKEN)
    return [int(t) for t in tokens] if tokens is not None else None


def score(meta: str | dict, completion: str) -> bool:
    """Exact match of the parsed order with the reference order."""
    return parse_order(completion) == load_meta(meta)["order"]


def question(rows: int, cols: int, prompt: str = "full") -> str:
    k = rows * cols
    example = " ".join(str(i % k + 1) for i in range(1, k + 1))  # a fixed rotation, not a hint about the answer
    return PROMPTS.get(prompt, prompt).format(rows=rows, cols=cols, k=k, example=example)


def _draws(seed: int, split: str, k: int) -> Iterator[tuple[int, list[int]]]:
    rng = random.Random(split_seed(seed, split))
    while True:
        yield rng.getrandbits(64), random_perm(rng, k)


def make_rows(
    split: str,
    n: int,
    *,
    rows: int = 2,
    cols: int = 2,
    piece_px: int = 56,
    seed: int = 0,
    prompt: str = "full",
    dedupe: bool = False,
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
) -> list[dict]:
    """n samples of `split` in the standard layout. A sample is (picture seed, shuffle); its content key hashes
    both with the drawing size, so the split of a picture is the same whatever the dataset seed."""
    k = rows * cols
    if k < 2:
        raise ValueError("a jigsaw needs at least 2 pieces")
    key = lambda d: f"{rows}x{cols}@{piece_px}:{d[0]}:{d[1]}"  # noqa: E731
    kept = take_for_split(
        _draws(seed, split, k), key, split, n, dedupe=dedupe, fractions=split_fractions, max_draws=max(1000, 50 * n)
    )
    text = question(rows, cols, prompt)
    out = []
    for i, (picture_seed, perm) in enumerate(kept):
        picture = draw_picture(random.Random(picture_seed), cols * piece_px, rows * piece_px)
        problem, vts = render(picture, perm, rows, cols, piece_px)
        order = answer_order(perm)
        out.append(
            {
                "id": f"jigsaw{rows}x{cols}-{split}-s{seed}-{i:05d}",
                "prompt": user_prompt(1, text),
                "images": [problem],
                "vt_images": vts,
                "answer": " ".join(map(str, order)),
                "task": "jigsaw",
                "meta": dump_meta({"rows": rows, "cols": cols, "order": order, "picture_seed": picture_seed}),
            }
        )
    return out
