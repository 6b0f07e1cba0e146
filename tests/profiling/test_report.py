"""``glm4v-edge report``: profile and eval results joined into the memory-versus-quality table and plot."""

from __future__ import annotations

import json

from glm4v_edge.cli import main

from ..support import png_stats


def test_report_joins_profile_and_eval(profile_out, eval_out, tmp_path):
    (prc, prof), (erc, ev) = profile_out, eval_out
    assert prc == erc == 0
    out = tmp_path / "report"
    assert main(["report", "--profile", str(prof), "--eval", str(ev / "results.jsonl"), "--out", str(out)]) == 0
    rows = {r["label"]: r for r in map(json.loads, (out / "report.jsonl").read_text().splitlines())}
    assert set(rows) == {"fp32@112", "int8@112", "nf4@112", "fp16@112"}
    nf4, int8, fp16 = rows["nf4@112"], rows["int8@112"], rows["fp16@112"]
    # nf4 was both profiled and evaluated: measured memory and speed beside its KL
    assert nf4["memory_kind"] == "measured" and nf4["memory_source"] == "rss"
    assert nf4["decode_tokens_per_s"] > 0 and nf4["kl_mean"] > 0 and nf4["memory_vs_baseline"] > 0
    # int8 was only evaluated: memory from the estimator, marked as such
    assert int8["memory_kind"] == "estimated" and int8["memory_bytes"] == int8["estimated_bytes"] > 0
    assert int8["decode_tokens_per_s"] is None
    # fp16 was only profiled: no quality numbers
    assert fp16["memory_kind"] == "measured" and fp16.get("kl_mean") is None
    md = (out / "report.md").read_text()
    assert "*estimated*" in md and "(rss)" in md and "Quality plotted: top1_agreement" in md
    assert "![memory versus quality](memory_vs_quality.png)" in md
    w, h, colours = png_stats(out / "memory_vs_quality.png")
    assert w > 500 and h > 400 and colours > 10


def test_report_quality_axis_can_be_chosen(eval_out, tmp_path):
    _, ev = eval_out
    out = tmp_path / "acc"
    assert main(["report", "--eval", str(ev), "--quality", "accuracy", "--out", str(out)]) == 0
    assert "Quality plotted: accuracy" in (out / "report.md").read_text()
    assert (out / "memory_vs_quality.png").stat().st_size > 5000


def test_report_bad_input(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path)]) == 2
    assert "at least one --profile or --eval" in capsys.readouterr().err
    bad = tmp_path / "results.jsonl"
    bad.write_text('{"precision": "nf4"}\n{oops\n')
    assert main(["report", "--eval", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "results.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert main(["report", "--profile", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
