"""``glm4v-edge eval --base-url`` against this project's own server (real uvicorn), not only a stub."""

from __future__ import annotations

import json
from dataclasses import replace

from glm4v import Message, SamplingParams, build_prompt
from glm4v.generate import generate_text
from glm4v_edge.cli import main
from profiling.vqa_synthetic import synthetic_items

from ..support import serve


def test_eval_base_url_against_our_server(base_settings, load_tiny, tmp_path, capsys):
    ref, cand = load_tiny("fp32"), load_tiny("nf4")
    roomy = replace(
        base_settings,
        max_image_bytes=8 << 20,
        max_image_pixels=4_000_000,
        max_request_bytes=32 << 20,
        max_model_len=512,
    )
    with serve(roomy, ref) as a, serve(roomy, cand) as b:
        out = tmp_path / "eval"
        rc = main(
            [
                "eval",
                "--base-url",
                f"{a.url}/v1,{b.url}/v1",
                "--limit",
                "4",
                "--seed",
                "3",
                "--max-new-tokens",
                "5",
                "--out",
                str(out),
            ]
        )
    assert rc == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["precision"] for r in rows] == ["fp32", "nf4"]  # read from each server's /v1/models
    assert rows[0]["greedy_match"] == 1.0 and rows[0]["is_reference"]
    assert rows[1]["kl_mean"] is None  # no logits over HTTP, and the output says so
    assert "no full next-token distribution" in capsys.readouterr().err

    # The server's greedy answer is the in-process one: same prompt ("\n" after <|assistant|>), same pixels.
    answers = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    first = answers[0]  # the reference server's answer to the first synthetic item
    item = synthetic_items(4, 3)[0]
    assert first["id"] == item.id and first["config"].endswith(f"{a.url}/v1")
    ids = build_prompt(ref.tokenizer, [Message("user", item.question + "\nShort Answer.", has_image=True)]).ids
    ids += ref.tokenizer.encode("\n")
    text, _, _ = generate_text(
        ref.model,
        ref.tokenizer,
        ids,
        ref.image_processor(item.png_bytes()),
        SamplingParams(max_new_tokens=5, temperature=0),
    )
    assert first["prediction"] == text.strip()
