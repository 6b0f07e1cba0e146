"""The same question is the same prompt through every front door: serve, chat, eval, profile and the benchmarks.

Each front door is run for real up to the point where it hands token ids to the model, and the ids are captured
there; all must equal :func:`glm4v.generation_prompt` (which ends ``<|assistant|>\\n``).
"""

from __future__ import annotations

import argparse
import io

import pytest
from PIL import Image

import glm4v.generate
from glm4v import Message, expanded_length, generation_prompt
from profiling.answerers import LocalAnswerer
from profiling.profile_worker import PROFILE_QUESTION, profile_prompt
from profiling.vqa_sets import Item

from .support import data_url, serve

QUESTION = PROFILE_QUESTION


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def expected(tiny_fp32):
    return generation_prompt(tiny_fp32.tokenizer, [Message("user", QUESTION, has_image=True)]).ids


def test_the_generation_prompt_ends_with_the_newline_the_model_writes_first(tiny_fp32, expected):
    tok = tiny_fp32.tokenizer
    assert expected[-2:] == [tok.token_id("<|assistant|>")] + tok.encode("\n")
    assert expanded_length(len(expected), 1602) == len(expected) - 3 + 1602
    assert expanded_length(len(expected), None) == len(expected)


def test_serve(base_settings, tiny_fp32, expected, monkeypatch):
    with serve(base_settings, tiny_fp32) as s:
        seen = []
        real = s.runtime.engine.submit
        monkeypatch.setattr(s.runtime.engine, "submit", lambda req: seen.append(req.prompt_ids) or real(req))
        r = s.post(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": QUESTION},
                            {"type": "image_url", "image_url": {"url": data_url(png())}},
                        ],
                    }
                ],
                "max_tokens": 2,
            }
        )
        assert r.status_code == 200, r.text
    assert seen == [expected]


def test_chat(tiny_dir, tmp_path, expected, monkeypatch):
    from glm4v_edge import chat

    image = tmp_path / "q.png"
    image.write_bytes(png())
    seen = []

    def fake_generate(model, tokenizer, ids, pixels, params):
        seen.append(list(ids))
        return iter(())

    monkeypatch.setattr(glm4v.generate, "generate", fake_generate)
    p = argparse.ArgumentParser()
    chat.add_arguments(p)
    assert (
        chat.run(
            p.parse_args(
                [QUESTION, "--image", str(image), "--model", str(tiny_dir), "--precision", "fp32", "--device", "cpu"]
            )
        )
        == 0
    )
    assert seen == [expected]


def test_eval(tiny_fp32, expected, tmp_path):
    path = tmp_path / "q.png"
    path.write_bytes(png())
    item = Item(id="q", image=path, question=QUESTION, answers=["x"])
    ids, _ = LocalAnswerer(tiny_fp32, suffix="").prepare(item)
    assert ids == expected


def test_profile(tiny_fp32, expected):
    assert profile_prompt(tiny_fp32.tokenizer, 0, with_image=True) == expected
    longer = profile_prompt(tiny_fp32.tokenizer, len(expected) + 20, with_image=True)
    assert len(longer) == len(expected) + 20 and longer[-2:] == expected[-2:]


def test_bench_local(tiny_fp32, expected):
    from profiling.bench.local import _prompt_inputs

    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": QUESTION},
                    {"type": "image_url", "image_url": {"url": data_url(png())}},
                ],
            }
        ]
    }
    ids, data = _prompt_inputs(tiny_fp32, body)
    assert ids == expected and data is not None
