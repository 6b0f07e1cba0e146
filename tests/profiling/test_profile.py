"""``glm4v-edge profile`` end to end: real subprocesses per configuration, all four outputs with their fields,
the fp16 baseline measured or estimated, the synthetic-weights path, failures and bad input."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from glm4v_edge.cli import main
from profiling.baseline import attach_baseline, baseline_summary

from ..support import png_stats

REQUIRED = (
    "precision",
    "vision_precision",
    "vision_size",
    "device",
    "memory_source",
    "peak_memory_bytes",
    "idle_memory_bytes",
    "load_s",
    "ttft_s",
    "decode_tokens_per_s",
    "estimated_bytes",
)


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_profile_two_precisions_writes_all_outputs(profile_out, tiny_dir):
    rc, out = profile_out
    assert rc == 0
    rows = _rows(out)
    assert [(r["precision"], r["role"], r["status"]) for r in rows] == [
        ("fp16", "config", "ok"),
        ("nf4", "config", "ok"),
    ]
    for r in rows:
        for k in REQUIRED:
            assert r[k] is not None, k
        assert r["memory_source"] == "rss" and r["device"] == "cpu" and r["vision_size"] == 112
        assert r["peak_memory_bytes"] >= r["idle_memory_bytes"] > 50 * 2**20  # RSS holds the torch runtime
        assert r["decode_tokens_per_s"] > 0 and 0 < r["vision_encode_s"] < r["prefill_s"] < r["ttft_s"]
        assert r["prompt_tokens"] == 40 and r["image_tokens"] == 18 and r["new_tokens"] == 4
        assert len(r["ttft_s_runs"]) == 2
        assert 0 <= r["other_cpu_share"] <= 1
        assert r["host_memory_idle"]["rss_anon_bytes"] > 0  # Linux /proc/self/status
        m = r["machine"]
        assert m["torch"] and m["transformers"] and m["bitsandbytes"] and m["cpu_cores"] >= 1
        assert "gpu_name" in m and "gpu_driver" in m
        assert r["command"].startswith("glm4v-edge profile --model") and "fp16,nf4" in r["command"]
        assert r["estimated_weights_bytes"] == r["weight_bytes"]  # the estimator predicts the loaded bytes
    fp16, nf4 = rows
    assert nf4["layers"]["language_model"] == {"Linear4bit": 8} and fp16["layers"]["language_model"] == {"Linear": 8}
    assert nf4["weight_bytes"] < fp16["weight_bytes"]
    # the fp16 row is the baseline; every row carries it and the ratios
    assert all(r["baseline_source"] == "measured" for r in rows)
    assert nf4["baseline_peak_memory_bytes"] == fp16["peak_memory_bytes"]
    assert nf4["memory_vs_baseline"] == pytest.approx(nf4["peak_memory_bytes"] / fp16["peak_memory_bytes"])
    assert nf4["speed_vs_baseline"] == pytest.approx(nf4["decode_tokens_per_s"] / fp16["decode_tokens_per_s"])

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["precision"] for t in table] == ["fp16", "nf4"]
    assert set(REQUIRED) <= set(table[0]) and "machine.torch" in table[0]
    md = (out / "results.md").read_text()
    assert "fp16 baseline" in md and "Command: `glm4v-edge profile" in md
    assert "| nf4@112" in md and "| 18 | rss |" in md  # label, image tokens, memory source
    for png in ("memory.png", "tokens_per_s.png"):
        w, h, colours = png_stats(out / png)
        assert w > 400 and h > 300 and colours > 10
    assert (out / "logs" / "nf4@112.log").is_file()


def test_synthetic_weights_over_vision_sizes_with_an_estimated_baseline(tmp_path, capsys):
    out = tmp_path / "synthetic"
    rc = main(
        [
            "profile",
            "--synthetic",
            "tiny",
            "--precision",
            "int8",
            "--vision-size",
            "112,56",
            "--baseline",
            "none",
            "--new-tokens",
            "3",
            "--repeat",
            "1",
            "--warmup",
            "0",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    rows = _rows(out)
    assert [(r["label"], r["vision_size"], r["image_tokens"]) for r in rows] == [
        ("int8@112", 112, 18),
        ("int8@56", 56, 6),
    ]
    for row in rows:
        assert row["status"] == "ok" and row["synthetic"] == "tiny" and row["model"] == "synthetic/tiny"
        assert row["layers"]["language_model"] == {"Linear8bitLt": 8} and row["vision_encode_s"] > 0
        assert row["prefill_above_idle_bytes"] == row["prefill_peak_bytes"] - row["idle_memory_bytes"]
        assert row["baseline_source"] == "estimated" and row["baseline_decode_tokens_per_s"] is None
        assert row["baseline_peak_memory_bytes"] > 0 and row["speed_vs_baseline"] is None
    vision = [r["estimate"]["breakdown"]["activation"]["vision_encoder"] for r in rows]
    assert vision[1] < vision[0]  # the estimator knows the smaller vision activation
    md = (out / "results.md").read_text()
    assert "*estimated*" in md and "--baseline none" in md


def test_worker_text_only_prompt_in_process(tiny_dir):
    from profiling.profile_worker import RunSpec, run

    row = run(
        RunSpec(
            precision="bf16",
            model=str(tiny_dir),
            device="cpu",
            prompt_tokens=24,
            new_tokens=3,
            image=None,
            warmup=0,
            repeat=1,
            idle_window_s=0.05,
            command="test",
        )
    )
    assert row["with_image"] is False and row["image_tokens"] == 0 and row["vision_encode_s"] is None
    assert row["prompt_tokens_expanded"] == row["prompt_tokens"] == 24 and row["new_tokens"] == 3
    assert row["estimate"]["context"] == 24 + 3 + 8 and row["command"] == "test"


def test_a_failing_configuration_is_reported_not_fatal(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")  # config.json still fine
    out = tmp_path / "out"
    rc = main(
        [
            "profile",
            "--model",
            str(broken),
            "--precision",
            "bf16",
            "--baseline",
            "none",
            "--repeat",
            "1",
            "--new-tokens",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 1
    (row,) = _rows(out)
    assert row["status"] == "error" and "safetensors" in row["error"]
    assert row["estimated_bytes"] > 0 and row["log_tail"]
    assert "failed (error)" in (out / "results.md").read_text()


def test_a_worker_past_its_time_limit_is_killed(tiny_dir, tmp_path):
    out = tmp_path / "slow"
    rc = main(
        [
            "profile",
            "--model",
            str(tiny_dir),
            "--precision",
            "bf16",
            "--baseline",
            "none",
            "--timeout-s",
            "0.5",
            "--out",
            str(out),
        ]
    )
    assert rc == 1
    (row,) = _rows(out)
    assert row["status"] == "timeout" and "0.5s" in row["error"]


def test_bad_input_is_named_before_anything_runs(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["profile", "--model", str(tiny_dir), "--precision", "bf16,int9", "--out", str(tmp_path)])
    assert e.value.code == 2 and "unknown precision 'int9' in 'bf16,int9'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["profile", "--model", str(tiny_dir), "--vision-size", "112,abc", "--out", str(tmp_path)])
    assert "'abc'" in capsys.readouterr().err
    assert main(["profile", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["profile", "--model", str(tiny_dir), "--synthetic", "tiny", "--out", str(tmp_path / "o")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["profile", "--model", str(tiny_dir), "--vision-size", "140", "--out", str(tmp_path / "o")]) == 2
    assert "vision size 140" in capsys.readouterr().err
    assert main(["profile", "--synthetic", "huge", "--out", str(tmp_path / "o")]) == 2
    assert "--synthetic 'huge'" in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_other_processes_cpu_share_arithmetic(monkeypatch):
    import os

    from profiling.profile_worker import other_cpu_share

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    # 10 s of wall time on 2 cores; all processes busy 15 CPU-s, of which ours 9 → others took 6 of 20 CPU-s
    assert other_cpu_share((100.0, 50.0, 0.0), (115.0, 59.0, 10.0)) == pytest.approx(0.3)
    assert other_cpu_share((100.0, 50.0, 0.0), (109.0, 59.5, 10.0)) == 0.0  # clamped: counters are not exact


def test_baseline_falls_back_to_the_estimate():
    rows = [
        {
            "label": "nf4@1120",
            "status": "ok",
            "precision": "nf4",
            "vision_precision": "nf4",
            "vision_size": 1120,
            "peak_memory_bytes": 10,
            "decode_tokens_per_s": 30.0,
            "ttft_s": 1.0,
        },
        {"label": "fp16@1120", "status": "oom", "precision": "fp16", "vision_precision": "fp16", "vision_size": 1120},
    ]
    base = baseline_summary(rows, 1120, lambda: 40, reason="the fp16 run failed")
    assert base["baseline_source"] == "estimated" and base["baseline_peak_memory_bytes"] == 40
    attach_baseline(rows, base)
    assert rows[0]["memory_vs_baseline"] == 0.25 and rows[0]["speed_vs_baseline"] is None
    rows[1].update(status="ok", peak_memory_bytes=20, decode_tokens_per_s=40.0, ttft_s=0.5)
    base = baseline_summary(rows, 1120, lambda: 40)
    attach_baseline(rows, base)
    assert base["baseline_source"] == "measured"
    r = rows[0]
    assert (r["memory_vs_baseline"], r["speed_vs_baseline"], r["ttft_vs_baseline"]) == (0.5, 0.75, 2.0)
