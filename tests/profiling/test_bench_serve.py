"""bench-serve: the HTTP load generator against a real server, and the in-process side-by-side run."""

from __future__ import annotations

import argparse
import json

import pytest

from glm4v_edge.cli import main
from profiling.bench.http_load import benchmark_http
from profiling.bench.results import summarize
from profiling.stats import percentile

from ..support import serve


def _args(**kw):
    base = dict(
        model_name=None,
        api_key=None,
        concurrency=[1, 3],
        requests=3,
        image=None,
        synthetic_images=True,
        image_side=48,
        prompt_tokens=8,
        max_tokens=6,
        timeout=60,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def test_summarize_percentiles():
    values = [float(i) for i in range(1, 101)]
    s = summarize(values)
    # the reports' one percentile definition (linear interpolation, numpy's default) — not nearest rank
    assert s["p50"] == 50.5 and s["p99"] == pytest.approx(99.01) and s["mean"] == 50.5
    assert s["p99"] == percentile(values, 99)
    assert summarize([]) == {"mean": None, "p50": None, "p99": None}


def test_http_benchmark_against_a_real_server(base_settings, tiny_fp32):
    with serve(base_settings, tiny_fp32) as srv:
        levels = benchmark_http(_args(), srv.url)
    assert [lv["concurrency"] for lv in levels] == [1, 3]
    for lv in levels:
        assert lv["requests"] == lv["completed"] == 3 and lv["failed"] == 0
        assert lv["output_tokens"] == 3 * 6  # ignore_eos: every request runs to max_tokens, counted from usage
        assert lv["prompt_tokens_mean"] > tiny_fp32.image_tokens()  # a synthetic image went with every request
        for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            stats = lv[key]
            assert set(stats) == {"mean", "p50", "p99"} and 0 < stats["p50"] <= stats["p99"]
        assert lv["e2e_s"]["p50"] >= lv["ttft_s"]["p50"]
        assert lv["output_tokens_per_s"] > 0 and lv["request_throughput"] > 0


def test_json_schema_constrains_every_request(base_settings, tiny_fp32, tmp_path):
    """--json-schema: each request sends the schema; a grammar that ends after '"x"' ends every answer there, despite
    ignore_eos (without the schema each request would produce max_tokens)."""
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"const": "x"}))
    with serve(base_settings, tiny_fp32) as srv:
        levels = benchmark_http(_args(concurrency=[2], json_schema=str(schema), max_tokens=20), srv.url)
    lv = levels[0]
    assert lv["completed"] == 3 and lv["failed"] == 0
    want = len(tiny_fp32.tokenizer.encode('"x"'))
    assert lv["output_tokens"] <= 3 * want < 3 * 20


def test_bench_grammar_measures_llguidance(tmp_path, capsys):
    out = tmp_path / "bg"
    args = ["bench-grammar", "--tokenizer", str(tmp_path / "absent"), "--engines", "llguidance", "--batch", "1,2"]
    assert main([*args, "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert "tiny checkpoint" in result["tokenizer"]
    (row,) = result["engines"]
    assert row["engine"] == "llguidance" and row["compile_s"] > 0
    assert set(row["batches"]) == {"1", "2"} and all(
        b["steps"] > 50 and b["fill_ms_mean"] > 0 for b in row["batches"].values()
    )
    assert "| llguidance |" in (out / "results.md").read_text()


def test_http_benchmark_counts_failures_instead_of_crashing(base_settings, tiny_fp32):
    with serve(base_settings, tiny_fp32) as srv:
        levels = benchmark_http(_args(model_name="no-such-model", concurrency=[2]), srv.url)
    assert levels[0]["failed"] == 3 and levels[0]["completed"] == 0
    assert "HTTP 404" in levels[0]["errors"][0]


def test_bench_serve_command_in_process_side_by_side(tiny_dir, tmp_path):
    out = tmp_path / "bench"
    rc = main(
        [
            "bench-serve",
            "--model",
            str(tiny_dir),
            "--precision",
            "fp32",
            "--concurrency",
            "1,2",
            "--requests",
            "2",
            "--max-tokens",
            "4",
            "--prompt-tokens",
            "6",
            "--synthetic-images",
            "--image-side",
            "40",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    levels = json.loads((out / "results.json").read_text())
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        assert {
            "concurrency",
            "requests",
            "output_tokens_per_s",
            "request_throughput",
            "ttft_s",
            "tpot_s",
            "itl_s",
            "e2e_s",
        } <= set(lv)
    local = json.loads((out / "local.json").read_text())
    assert local["plain"]["output_tokens"] == 2 * 4 and [e["concurrency"] for e in local["engine"]] == [1, 2]
    md = (out / "results.md").read_text()
    assert "plain decode loop" in md and "engine in-process" in md and "engine over HTTP" in md


def test_bad_concurrency_is_refused(tmp_path, capsys):
    assert main(["bench-serve", "--base-url", "http://127.0.0.1:9", "--concurrency", "0", "--out", str(tmp_path)]) == 2
    assert "positive integers" in capsys.readouterr().err


def test_image_flags_are_exclusive(tmp_path):
    with pytest.raises(SystemExit):
        main(
            ["bench-serve", "--base-url", "http://x", "--image", "a.png", "--synthetic-images", "--out", str(tmp_path)]
        )


def test_multi_turn_mode_against_a_server(base_settings, tiny_fp32):
    """--turns: each turn resends the history (its prompt grows by the answer and a question) and is timed."""
    from dataclasses import replace

    from profiling.bench.multi_turn import benchmark_multi_turn, markdown

    with serve(replace(base_settings, max_model_len=512), tiny_fp32) as srv:
        args = _args(turns=3, requests=2, concurrency=[2], max_tokens=4, image_side=40)
        (level,) = benchmark_multi_turn(args, srv.url)
        hits = srv.runtime.engine.stats().prefix_hits
    turns = level["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3] and all(t["completed"] == 2 for t in turns)
    prompts = [t["prompt_tokens_mean"] for t in turns]
    assert prompts[0] > tiny_fp32.image_tokens() and prompts[0] < prompts[1] < prompts[2]
    assert turns[0]["ttft_p50_over_turn1"] == 1.0 and turns[1]["ttft_p50_over_turn1"] > 0
    assert hits >= 4  # turns 2 and 3 of both conversations reused their row
    assert level["server_caches"]["prefix_cache"]["hits"] == hits
    assert "| 2 | 3 | 2/2 |" in markdown([level], {"command": "x"})


def test_multi_turn_command_starts_its_own_server(tiny_dir, tmp_path):
    out = tmp_path / "turns"
    rc = main(
        ["bench-serve", "--model", str(tiny_dir), "--precision", "fp32", "--turns", "2", "--requests", "1"]
        + ["--concurrency", "1", "--max-tokens", "3", "--prompt-tokens", "4", "--image-side", "40", "--out", str(out)]
    )
    assert rc == 0
    (level,) = json.loads((out / "results.json").read_text())
    assert [t["completed"] for t in level["turns"]] == [1, 1]
    assert "TTFT p50 / turn 1" in (out / "results.md").read_text()
