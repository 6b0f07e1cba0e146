"""A built-in visual-QA set drawn with Pillow, deterministic for a seed: colours, shapes, counting, words, digits.

Why synthetic: it needs no download, every answer is known exactly, and it can target what quantization and a
lower vision resolution damage first. The text items come in several sizes on a 1120×1120 canvas (the model's
native input): 96-px text survives anything, 12-px text is about one patch (14 px) tall at 1120 and under half a
patch at 448 — so the small-text scores are where resolution and quantization loss show up.

Every image is drawn on demand from its item's own seed (nothing is held in memory), with Pillow's bundled font
(``ImageFont.load_default(size)``), so the same Pillow version draws the same pixels on any machine.
"""

from __future__ import annotations

import random
from functools import partial

from PIL import Image, ImageDraw, ImageFont

from .vqa_sets import Item

CANVAS = 1120
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 150, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "orange": (245, 130, 20),
    "purple": (130, 50, 170),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
WORDS = ("EDGE", "CAT", "RIVER", "MODEL", "PIXEL", "GLASS", "HORSE", "TABLE", "LIGHT", "QUANT", "PAPER", "MUSIC")
TEXT_SIZES_PX = (96, 48, 24, 12)  # font size on the 1120 canvas
KINDS = ("colour", "shape", "count", "word", "digits")
SUFFIX = "\nShort Answer."  # VLMEvalKit's GLM-4V prompt suffix for short-answer sets (docs/MODEL.md §8.7)
NUMBER_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("RGB", (CANVAS, CANVAS), (255, 255, 255))
    return im, ImageDraw.Draw(im)


def _shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def draw_single(shape: str, colour: str, seed: int) -> Image.Image:
    rng = random.Random(seed)
    im, draw = _canvas()
    side = rng.randint(360, 640)
    x, y = rng.randint(40, CANVAS - side - 40), rng.randint(40, CANVAS - side - 40)
    _shape(draw, shape, (x, y, x + side, y + side), COLOURS[colour])
    return im


def draw_count(shape: str, colour: str, count: int, seed: int) -> Image.Image:
    """``count`` shapes in distinct cells of a 4×4 grid (never touching), plus distractors of another colour."""
    rng = random.Random(seed)
    im, draw = _canvas()
    cell = CANVAS // 4
    cells = rng.sample(range(16), count + 2)
    other = rng.choice([c for c in COLOURS if c != colour])
    for i, c in enumerate(cells):
        side = rng.randint(cell // 3, cell - 50)
        x = (c % 4) * cell + rng.randint(20, cell - side - 20)
        y = (c // 4) * cell + rng.randint(20, cell - side - 20)
        fill = COLOURS[colour] if i < count else COLOURS[other]
        _shape(draw, shape, (x, y, x + side, y + side), fill)
    return im


def draw_text(text: str, size_px: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    im, draw = _canvas()
    font = ImageFont.load_default(size=size_px)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    w, h = x1 - x0, y1 - y0
    x = rng.randint(20, CANVAS - w - 20) - x0
    y = rng.randint(20, CANVAS - h - 20) - y0
    draw.text((x, y), text, fill=(0, 0, 0), font=font)
    return im


def synthetic_items(n: int = 60, seed: int = 0) -> list[Item]:
    """``n`` items cycling through the kinds (and the text items through the sizes), reproducible for a seed."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        s = rng.randrange(2**31)
        size = TEXT_SIZES_PX[(i // len(KINDS)) % len(TEXT_SIZES_PX)]
        colour = rng.choice(list(COLOURS))
        shape = rng.choice(SHAPES)
        if kind == "colour":
            q, ans, cat = "What colour is the shape in the image? Answer with one word.", [colour], "colour"
            img = partial(draw_single, shape, colour, s)
        elif kind == "shape":
            q, ans, cat = "What shape is in the image? Answer with one word.", [shape], "shape"
            img = partial(draw_single, shape, colour, s)
        elif kind == "count":
            k = rng.randint(1, 6)
            q = f"How many {colour} {shape}s are in the image? Answer with a number."
            ans, cat = [str(k), NUMBER_NAMES[k]], "count"
            img = partial(draw_count, shape, colour, k, s)
        elif kind == "word":
            word = rng.choice(WORDS)
            q, ans, cat = "What word is written in the image? Answer with the word only.", [word], f"word@{size}px"
            img = partial(draw_text, word, size, s)
        else:
            number = str(rng.randint(1000, 999999))
            q = "What number is written in the image? Answer with the number only."
            ans, cat = [number], f"digits@{size}px"
            img = partial(draw_text, number, size, s)
        items.append(Item(f"synthetic-{seed}-{i:04d}", q, ans, img, cat, {"kind": kind, "seed": s}))
    return items
