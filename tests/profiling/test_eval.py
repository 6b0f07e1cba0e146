"""``glm4v-edge eval``: fidelity of int8 and nf4 against fp32 on the tiny model, the synthetic task set, user
JSONL sets, scoring and its interval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from glm4v_edge.cli import main
from profiling.eval_cli import load_tasks
from profiling.fidelity import FidelityStats
from profiling.vqa_sets import load_jsonl_set, normalize, normalized_match, relaxed_match, score, write_jsonl_set
from profiling.vqa_synthetic import COLOURS, TEXT_SIZES_PX, synthetic_items


def _rows(out, name="results.jsonl"):
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def test_int8_is_closer_to_fp32_than_nf4(eval_out):
    rc, out = eval_out
    assert rc == 0
    rows = _rows(out)
    assert [(r["precision"], r["is_reference"]) for r in rows] == [("fp32", True), ("int8", False), ("nf4", False)]
    ref, int8, nf4 = rows
    for r in rows:
        for k in (
            "precision",
            "reference",
            "kl_mean",
            "kl_p99",
            "top1_agreement",
            "greedy_match",
            "accuracy",
            "accuracy_ci_low",
            "accuracy_ci_high",
        ):
            assert r[k] is not None, k
        assert r["reference"] == "fp32" and r["n_items"] == 10 and r["task"] == "synthetic"
        assert 0 <= r["accuracy_ci_low"] <= r["accuracy"] <= r["accuracy_ci_high"] <= 1
        assert r["n_tokens"] == ref["n_tokens"] > 10  # every configuration scored on the reference's tokens
    assert ref["kl_mean"] == 0 and ref["top1_agreement"] == 1 and ref["greedy_match"] == 1
    assert 0 < int8["kl_mean"] < nf4["kl_mean"]
    assert int8["kl_p99"] < nf4["kl_p99"]
    assert int8["top1_agreement"] > nf4["top1_agreement"]
    assert int8["greedy_match"] >= nf4["greedy_match"]
    assert int8["kl_mean"] <= int8["kl_p99"] <= int8["kl_max"]
    answers = _rows(out, "answers.jsonl")
    assert len(answers) == 30 and {a["config"] for a in answers} == {"fp32@112", "int8@112", "nf4@112"}
    md = (out / "results.md").read_text()
    assert "int8@112" in md and "(reference)" in md and "Wilson" in md


def test_kl_statistics_match_closed_form():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]]).log()
    q = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]).log()
    stats = FidelityStats()
    kl = stats.add(p, q, [0, 1])
    expected = (p.exp() * (p - q)).sum(-1)
    assert torch.allclose(kl.float(), expected, atol=1e-6)
    s = stats.summary()
    assert s["top1_agreement"] == 0.5  # row 0 agrees on token 0, row 1 does not
    assert s["delta_p_rms"] == pytest.approx(((0.6 - 0.7) ** 2 / 2 + (0.5 - 0.25) ** 2 / 2) ** 0.5)
    same = FidelityStats()
    same.add(p, p.clone(), [0, 0])
    assert same.summary()["kl_max"] == 0 and same.summary()["top1_agreement"] == 1
    with pytest.raises(ValueError, match="shapes differ"):
        stats.add(p, q[:1], [0])


def test_synthetic_set_is_deterministic_and_covers_every_kind():
    a, b = synthetic_items(40, seed=3), synthetic_items(40, seed=3)
    assert [x.png_bytes() for x in a[:10]] == [x.png_bytes() for x in b[:10]]
    assert a[0].png_bytes() != synthetic_items(1, seed=4)[0].png_bytes()
    cats = {x.category for x in a}
    assert {"colour", "shape", "count"} <= cats
    assert {f"digits@{n}px" for n in TEXT_SIZES_PX} <= cats and {f"word@{n}px" for n in TEXT_SIZES_PX} <= cats
    for item in a[:5]:
        im = item.open_image()
        assert im.size == (1120, 1120)
        if item.category == "colour":
            assert COLOURS[item.answers[0]] in {c for _, c in im.getcolors(1 << 16)}
    small = next(x for x in a if x.category == "digits@12px")
    dark = int((np.asarray(small.open_image().convert("L")) < 128).sum())
    big = next(x for x in a if x.category == "digits@96px")
    dark_big = int((np.asarray(big.open_image().convert("L")) < 128).sum())
    assert 0 < dark < dark_big / 20  # the small text is really small, and really there


def test_scoring_normalizes_numbers_case_and_punctuation():
    assert normalize("Three.") == "3" and normalize("The RED circle!") == "red circle" and normalize("4,821") == "4821"
    assert normalized_match("Red.", ["red"]) and normalized_match("three", ["3", "three"])
    assert not normalized_match("The circle is red", ["red"]) and relaxed_match("The circle is red", ["red"])
    assert not relaxed_match("reddish", ["red"])
    items = synthetic_items(10)
    s = score([it.answers[0] for it in items[:5]] + ["nonsense"] * 5, items)
    assert (s["accuracy"], s["n_correct"], s["accuracy_exact"]) == (0.5, 5, 0.5)
    assert s["accuracy_ci_low"] == pytest.approx(0.2366, abs=1e-4)
    assert s["accuracy_ci_high"] == pytest.approx(0.7634, abs=1e-4)
    zero = score(["x"] * 10, items)
    assert zero["accuracy_ci_low"] == 0 and zero["accuracy_ci_high"] == pytest.approx(0.2775, abs=1e-4)


def test_user_jsonl_set_round_trip(tmp_path):
    items = synthetic_items(4, seed=1)
    path = write_jsonl_set(items, tmp_path / "set")
    loaded = load_jsonl_set(path)
    assert [(x.question, x.answers, x.category) for x in loaded] == [(x.question, x.answers, x.category) for x in items]
    assert np.array_equal(np.asarray(loaded[2].open_image()), np.asarray(items[2].open_image()))
    both, names = load_tasks(["synthetic", str(path)], limit=3, seed=0)
    assert len(both) == 6 and names == ["synthetic", str(path)]


def test_bad_jsonl_lines_are_named(tmp_path):
    f = tmp_path / "set.jsonl"
    (tmp_path / "a.png").write_bytes(synthetic_items(1)[0].png_bytes())
    good = '{"image": "a.png", "question": "q?", "answers": "x"}'
    cases = {
        "{not json": "set.jsonl:2: not valid JSON",
        '{"image": "a.png", "question": "q?"}': "set.jsonl:2: missing 'answers'",
        '{"image": "b.png", "question": "q?", "answers": ["x"]}': "set.jsonl:2: image 'b.png' not found",
        '{"image": "a.png", "question": "q?", "answers": []}': "set.jsonl:2: 'answers' must be",
    }
    for line, message in cases.items():
        f.write_text(good + "\n" + line + "\n")
        with pytest.raises(ValueError, match=message):
            load_jsonl_set(f)
    f.write_text(good + "\n")
    assert load_jsonl_set(f)[0].answers == ["x"]


def test_eval_bad_input(tiny_dir, tmp_path, capsys):
    # No --model is the demo model now (tests/profiling/test_demo_ladder.py); bad values still stop it first.
    assert main(["eval", "--limit", "0", "--out", str(tmp_path)]) == 2
    assert "--limit and --max-new-tokens must be at least 1" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dir), "--task", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tiny_dir), "--reference", "bf17", "--out", str(tmp_path)])
    assert "unknown precision 'bf17'" in capsys.readouterr().err
