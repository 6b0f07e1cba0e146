"""The demo task set: deterministic, every kind drawn and answerable, pictures that scale with the canvas, and the
held-out set disjoint from what training draws."""

from __future__ import annotations

import random

import numpy as np
import pytest

from profiling.vqa_demo import (
    CORE_KINDS,
    HELD_OUT_SEED,
    KINDS,
    answer_sentence,
    demo_item,
    demo_items,
    follow_up_questions,
    vocabulary_text,
)


def test_items_are_reproducible_and_cycle_through_the_kinds():
    a, b = demo_items(16), demo_items(16)
    assert [it.category for it in a] == list(KINDS) * 2
    for x, y in zip(a, b, strict=True):
        assert (x.question, x.answers) == (y.question, y.answers)
        assert np.array_equal(np.asarray(x.open_image()), np.asarray(y.open_image()))
    other = demo_items(16, HELD_OUT_SEED + 1)
    assert [it.meta["seed"] for it in other] != [it.meta["seed"] for it in a]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_draws_a_picture_with_content_and_one_answer(kind):
    it = demo_item(kind, random.Random(3))
    im = np.asarray(it.open_image())
    assert im.shape == (224, 224, 3)
    assert (im != 255).any(axis=-1).mean() > 0.01  # something is drawn
    assert len(it.answers) == 1 and it.answers[0] == answer_sentence(kind, it.meta["value"])


def test_the_canvas_scales():
    it = demo_items(1, kinds=("position",), side=448)[0]
    small = demo_items(1, kinds=("position",))[0]
    assert it.answers == small.answers
    big = np.asarray(it.open_image())
    assert big.shape == (448, 448, 3)
    # The same drawing at twice the size: its ink covers the same fraction of the picture.
    ink = lambda a: (a != 255).any(axis=-1).mean()  # noqa: E731
    assert abs(ink(big) - ink(np.asarray(small.open_image()))) < 0.01


def test_the_position_answer_is_where_the_ink_is():
    for it in demo_items(12, kinds=("position",)):
        ys, xs = np.nonzero((np.asarray(it.open_image()) != 255).any(axis=-1))
        cx, cy = xs.mean(), ys.mean()
        where = it.meta["value"]
        expected = {"left": cx < 80, "right": cx > 144, "top": cy < 80, "bottom": cy > 144}[where]
        assert expected, (where, cx, cy)


def test_follow_up_questions_are_about_the_same_picture():
    it = demo_items(4, kinds=("position",))[0]
    qa = follow_up_questions(it, random.Random(0))
    answers = [a for _, a in qa]
    assert answers == [f"It is {it.meta['colour']}.", f"It is a {it.meta['shape']}."]
    assert follow_up_questions(demo_items(1, kinds=("clock",))[0], random.Random(0)) == []


def test_training_streams_never_draw_the_held_out_items():
    """Training draws from random.Random(seed) streams of small seeds; the held-out items' picture seeds do not occur
    in the first 100,000 draws of the training stream (seed 0)."""
    held = {it.meta["seed"] for it in demo_items(200)}
    rng = random.Random(0)
    seen = set()
    for _ in range(100_000):
        seen.add(rng.randrange(2**31))
    assert not held & seen


def test_the_vocabulary_covers_every_answer():
    text = vocabulary_text()
    for kind in CORE_KINDS:
        for it in demo_items(8, kinds=(kind,)):
            assert it.answers[0] in text
