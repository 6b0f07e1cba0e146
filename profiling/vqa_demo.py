"""The demo model's task set: visual questions drawn with Pillow, answered in short sentences, for any canvas size.

One generator serves three users, so they cannot drift apart: ``tools/train_demo.py`` trains the shipped demo
checkpoint on an endless stream of these items (training seeds), ``glm4v-edge eval --task demo`` scores any model on
held-out items (other seeds, exact-match on the sentence), and the end-to-end tests send a fixed handful through the
HTTP server.

Kinds (each item's ``category``): ``colour`` and ``shape`` of one shape, ``count`` (1-4 equal shapes), ``position``
(left / right / top / bottom), ``size`` (big / small), ``word`` (one of :data:`WORDS`, printed large), ``clock`` (a
digital clock, H:MM), ``chart`` (the tallest of three bars). :func:`text_exchanges` are the plain-text turns the
model also learns (greeting, who it is), with no image.

Images are drawn at 224 px (the demo model's native size) by default and scale with ``side``: the tests draw them
larger, so the server's resize is exercised. Every image is drawn from its item's own seed with Pillow's bundled
font, so the same Pillow version draws the same pixels on any machine.
"""

from __future__ import annotations

import random
from functools import partial

from PIL import Image, ImageDraw, ImageFont

from .vqa_sets import Item
from .vqa_synthetic import COLOURS  # the same seven colours, the same RGB

NATIVE = 224
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
SIZES = ("big", "small")
WORDS = ("CAT", "DOG", "SUN", "MOON", "TREE", "FISH", "BIRD", "STAR", "BOOK", "CAKE")
MINUTES = ("00", "15", "30", "45")
NUMBER_NAMES = ("zero", "one", "two", "three", "four")
MAX_COUNT = 4
KINDS = ("colour", "shape", "count", "position", "size", "word", "clock", "chart")
# What the E2E tests and the "sees" claims rest on: colour, shape, count and position.
CORE_KINDS = ("colour", "shape", "count", "position")

TEXT_EXCHANGES = (
    ("Hello", "Hello! Send me a picture and ask about it."),
    ("Hi", "Hello! Send me a picture and ask about it."),
    ("Who are you?", "I am a small demo model of the GLM-4V architecture."),
    ("What can you do?", "I can tell colours, shapes, counts, positions, words, clocks and charts in pictures."),
    ("Are you GLM-4V-9B?", "No. I am a small demo model of the GLM-4V architecture."),
    ("Thank you", "You are welcome."),
)


def answer_sentence(kind: str, value: str) -> str:
    """The one answer the model is trained to give (exact match is scored on it)."""
    if kind in ("colour", "size"):
        return f"It is {value}."
    if kind == "shape":
        return f"It is a {value}."
    if kind == "count":
        n = int(value)
        return "There is one." if n == 1 else f"There are {NUMBER_NAMES[n]}."
    if kind == "position":
        return f"It is on the {value}." if value in ("left", "right") else f"It is at the {value}."
    if kind == "word":
        return f"It says {value}."
    if kind == "clock":
        return f"It is {value}."
    if kind == "chart":
        return f"The {value} bar."
    raise ValueError(f"unknown kind {kind!r}")


# ---- drawing (coordinates on a 224 grid, scaled by side / 224) ----------------------------------------------------
def _canvas(side: int, background=(255, 255, 255)) -> tuple[Image.Image, ImageDraw.ImageDraw, float]:
    im = Image.new("RGB", (side, side), background)
    return im, ImageDraw.Draw(im), side / NATIVE


def _shape(draw: ImageDraw.ImageDraw, shape: str, box, fill, k: float) -> None:
    x0, y0, x1, y1 = (round(v * k) for v in box)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def draw_single(shape: str, colour: str, seed: int, side: int = NATIVE) -> Image.Image:
    rng = random.Random(seed)
    im, draw, k = _canvas(side)
    s = rng.randint(70, 140)
    x, y = rng.randint(10, NATIVE - s - 10), rng.randint(10, NATIVE - s - 10)
    _shape(draw, shape, (x, y, x + s, y + s), COLOURS[colour], k)
    return im


def draw_count(shape: str, colour: str, count: int, seed: int, side: int = NATIVE) -> Image.Image:
    """``count`` equal shapes (one size) in distinct cells of a 3×3 grid, never touching."""
    rng = random.Random(seed)
    im, draw, k = _canvas(side)
    cell = NATIVE // 3
    s = rng.randint(40, 50)
    for c in rng.sample(range(9), count):
        x = (c % 3) * cell + rng.randint(6, cell - s - 6)
        y = (c // 3) * cell + rng.randint(6, cell - s - 6)
        _shape(draw, shape, (x, y, x + s, y + s), COLOURS[colour], k)
    return im


def draw_position(shape: str, colour: str, where: str, seed: int, side: int = NATIVE) -> Image.Image:
    rng = random.Random(seed)
    im, draw, k = _canvas(side)
    s = rng.randint(44, 64)
    along = rng.randint(NATIVE // 2 - 40, NATIVE // 2 + 40) - s // 2  # near the middle of its edge
    edge = rng.randint(6, 24)
    x, y = {
        "left": (edge, along),
        "right": (NATIVE - edge - s, along),
        "top": (along, edge),
        "bottom": (along, NATIVE - edge - s),
    }[where]
    _shape(draw, shape, (x, y, x + s, y + s), COLOURS[colour], k)
    return im


def draw_size(shape: str, colour: str, size: str, seed: int, side: int = NATIVE) -> Image.Image:
    rng = random.Random(seed)
    im, draw, k = _canvas(side)
    s = rng.randint(150, 200) if size == "big" else rng.randint(30, 56)
    x, y = rng.randint(8, NATIVE - s - 8), rng.randint(8, NATIVE - s - 8)
    _shape(draw, shape, (x, y, x + s, y + s), COLOURS[colour], k)
    return im


def _text(draw: ImageDraw.ImageDraw, text: str, size_px: int, rng: random.Random, side: int, fill, box=None) -> None:
    font = ImageFont.load_default(size=size_px)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    w, h = x1 - x0, y1 - y0
    bx0, by0, bx1, by1 = box or (0, 0, side, side)
    x = rng.randint(bx0 + 4, max(bx0 + 4, bx1 - w - 4)) - x0
    y = rng.randint(by0 + 4, max(by0 + 4, by1 - h - 4)) - y0
    draw.text((x, y), text, fill=fill, font=font)


def draw_word(word: str, seed: int, side: int = NATIVE) -> Image.Image:
    rng = random.Random(seed)
    im, draw, k = _canvas(side)
    _text(draw, word, round(rng.randint(44, 56) * k), rng, side, COLOURS[rng.choice(("black", "blue", "red"))])
    return im


def draw_clock(time: str, seed: int, side: int = NATIVE) -> Image.Image:
    """A digital clock: light digits on a dark panel."""
    rng = random.Random(seed)
    im, draw, k = _canvas(side)
    x0, y0 = rng.randint(4, 40), rng.randint(30, 100)
    panel = (round(x0 * k), round(y0 * k), round((x0 + 180) * k), round((y0 + 90) * k))
    draw.rectangle(panel, fill=(25, 25, 30))
    _text(draw, time, round(rng.randint(50, 58) * k), rng, side, (80, 255, 120), box=panel)
    return im


def draw_chart(heights: tuple[int, ...], colours: tuple[str, ...], seed: int, side: int = NATIVE) -> Image.Image:
    """Three bars on a baseline, left to right."""
    rng = random.Random(seed)
    im, draw, k = _canvas(side)
    base = NATIVE - rng.randint(14, 30)
    y = round(base * k)
    draw.line((round(10 * k), y, round(214 * k), y), fill=(0, 0, 0), width=max(1, round(2 * k)))
    w = rng.randint(40, 54)
    for i, (h, c) in enumerate(zip(heights, colours, strict=True)):
        x = 22 + i * 64 + rng.randint(-4, 4)
        _shape(draw, "square", (x, base - h, x + w, base), COLOURS[c], k)
    return im


# ---- items -------------------------------------------------------------------------------------------------------
def demo_item(kind: str, rng: random.Random, side: int = NATIVE, index: int = 0, prefix: str = "demo") -> Item:
    """One item of ``kind`` drawn from ``rng``: question, the accepted answer sentence, and the image's drawer."""
    s = rng.randrange(2**31)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    if kind == "colour":
        q = rng.choice((f"What colour is the {shape}?", "What colour is the shape?"))
        value, img = colour, partial(draw_single, shape, colour, s, side)
    elif kind == "shape":
        q = rng.choice(("What shape is this?", "What shape is in the picture?"))
        value, img = shape, partial(draw_single, shape, colour, s, side)
    elif kind == "count":
        n = rng.randint(1, MAX_COUNT)
        q = rng.choice((f"How many {shape}s are there?", "How many shapes are there?"))
        value, img = str(n), partial(draw_count, shape, colour, n, s, side)
    elif kind == "position":
        where = rng.choice(POSITIONS)
        q = rng.choice((f"Where is the {shape}?", "Where is the shape?"))
        value, img = where, partial(draw_position, shape, colour, where, s, side)
    elif kind == "size":
        size = rng.choice(SIZES)
        q = f"Is the {shape} big or small?"
        value, img = size, partial(draw_size, shape, colour, size, s, side)
    elif kind == "word":
        value = rng.choice(WORDS)
        q, img = "What word is written in the picture?", partial(draw_word, value, s, side)
    elif kind == "clock":
        value = f"{rng.randint(1, 12)}:{rng.choice(MINUTES)}"
        q, img = "What time does the clock show?", partial(draw_clock, value, s, side)
    elif kind == "chart":
        cols = tuple(rng.sample(list(COLOURS)[:6], 3))  # no black bars on the black baseline
        top = rng.randrange(3)
        heights = [rng.randint(40, 110) for _ in range(3)]
        heights[top] = max(heights) + rng.randint(30, 60)
        q, value = "Which bar is the tallest?", cols[top]
        img = partial(draw_chart, tuple(heights), cols, s, side)
    else:
        raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    # prompt_suffix "": the question as trained, without eval's "Short Answer." suffix for real models.
    meta = {"kind": kind, "value": value, "seed": s, "colour": colour, "shape": shape, "prompt_suffix": ""}
    return Item(f"{prefix}-{index:04d}", q, [answer_sentence(kind, value)], img, kind, meta)


HELD_OUT_SEED = 10_000  # training streams use seeds below this one


def demo_items(
    n: int = 80, seed: int = HELD_OUT_SEED, side: int = NATIVE, kinds: tuple[str, ...] = KINDS
) -> list[Item]:
    """``n`` held-out items cycling through ``kinds``, reproducible for a seed.

    Training draws from seeds below 10,000 (``tools/train_demo.py``), so the default seed is held out; the items'
    images are new pixels either way (positions, sizes and colours are drawn per item).
    """
    rng = random.Random(seed)
    return [demo_item(kinds[i % len(kinds)], rng, side, i, f"demo-{seed}") for i in range(n)]


def follow_up_questions(item: Item, rng: random.Random) -> list[tuple[str, str]]:
    """Other questions the same picture answers (training asks several per image, as a multi-turn chat): colour and
    shape of a single shape, also for the position and size pictures."""
    kind, colour, shape = item.meta["kind"], item.meta["colour"], item.meta["shape"]
    out = []
    if kind in ("colour", "shape", "position", "size"):
        if kind != "colour":
            q = rng.choice((f"What colour is the {shape}?", "What colour is the shape?"))
            out.append((q, answer_sentence("colour", colour)))
        if kind != "shape":
            out.append(
                (rng.choice(("What shape is this?", "What shape is in the picture?")), answer_sentence("shape", shape))
            )
    return out


def text_exchanges() -> tuple[tuple[str, str], ...]:
    return TEXT_EXCHANGES


def vocabulary_text() -> str:
    """Every question and answer the tasks can produce, for training the demo tokenizer's merges."""
    parts = []
    for shape in SHAPES:
        parts += [f"What colour is the {shape}?", f"How many {shape}s are there?", f"Where is the {shape}?"]
        parts += [f"Is the {shape} big or small?", answer_sentence("shape", shape)]
    parts += ["What colour is the shape?", "What shape is this?", "What shape is in the picture?"]
    parts += ["How many shapes are there?", "Where is the shape?", "What word is written in the picture?"]
    parts += ["What time does the clock show?", "Which bar is the tallest?"]
    parts += [answer_sentence("colour", c) + " " + answer_sentence("chart", c) for c in COLOURS]
    parts += [answer_sentence("count", str(n)) for n in range(1, MAX_COUNT + 1)]
    parts += [answer_sentence("position", p) for p in POSITIONS] + [answer_sentence("size", s) for s in SIZES]
    parts += [answer_sentence("word", w) for w in WORDS]
    parts += [answer_sentence("clock", f"{h}:{m}") for h in range(1, 13) for m in MINUTES]
    parts += [f"{q} {a}" for q, a in TEXT_EXCHANGES]
    return "\n".join(parts)
