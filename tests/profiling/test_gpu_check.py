"""glm4v-edge gpu-check on this CPU with --synthetic tiny: the same script a GPU box runs, end to end (every step in
its own process, the HTTP leg against a real server), so it cannot rot before a GPU is lent; plus the budget, the
wheel installation and the estimator's card claims."""

from __future__ import annotations

import json
import sys
import zipfile

import pytest

from glm4v_edge.cli import main
from profiling import gpu_check
from profiling.results_io import read_jsonl

CONFIG_COLUMNS = (
    "name",
    "label",
    "flags",
    "status",
    "estimated_total_bytes",
    "claimed_card_gib",
    "card_status",
    "load_s",
    "weight_bytes",
    "used_after_load_bytes",
    "peak_used_bytes",
    "vision_encode_s",
    "ttft_s",
    "decode_tok_s_b1",
    "decode_tok_s_b2",
    "decode_bytes_per_s_b1",
    "decode_bandwidth_fraction_b1",
    "compile_status",
)


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path, capsys):
    out = tmp_path / "gc"
    rc = main(
        [
            "--log-level",
            "WARNING",
            "gpu-check",
            "--device",
            "cpu",
            "--synthetic",
            "tiny",
            "--configs",
            "bf16,6gb",
            "--prompt-tokens",
            "64",
            "--image-side",
            "224",
            "--batches",
            "1,2",
            "--decode-steps",
            "4",
            "--compile-for",
            "6gb",
            "--compile-mode",
            "aot_eager",
            "--http-concurrency",
            "1,2",
            "--http-requests",
            "2",
            "--http-max-tokens",
            "4",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().out
    rows = read_jsonl(out / "results.jsonl")
    assert [r["kind"] for r in rows] == ["meta", "environment", "config", "config", "http", "http"]
    meta, env, configs, http = rows[0], rows[1], rows[2:4], rows[4:]
    assert meta["device"] == "cpu" and meta["batches"] == [1, 2] and meta["elapsed_s"] > 0
    assert env["status"] == "ok" and env["bandwidth_bytes_per_s"] > 0 and env["bnb_nf4"] == "ok"
    assert env["imports"] == dict.fromkeys(("fastapi", "uvicorn", "pydantic", "bitsandbytes"), "ok")
    for row in configs:
        missing = [c for c in CONFIG_COLUMNS if c not in row]
        assert not missing, missing
        assert row["status"] == "ok" and row["card_status"] == "skipped"  # no CUDA: said so in the row
        assert row["decode_tok_s_b1"] > 0 and row["decode_tok_s_b2"] > 0 and 0 < row["decode_bandwidth_fraction_b1"]
        assert row["peak_used_bytes"] >= row["used_after_load_bytes"] > 0
    bf16, low = configs
    assert bf16["compile_status"].startswith("skipped: not in --compile-for")
    assert low["compile_status"] == "ok" and low["decode_tok_s_b2_compiled"] > 0 and low["compile_s"] > 0
    assert low["flags"] == "--precision nf4 --offload vision,embeddings --lm-head-precision nf4"
    assert low["host_bytes"] > 0 and low["stream_bytes_per_image"] > 0  # the vision tower really was streamed
    assert [r["concurrency"] for r in http] == [1, 2]
    assert all(r["status"] == "ok" and r["completed"] == 2 and r["output_tokens_per_s"] > 0 for r in http)
    md = (out / "results.md").read_text()
    for heading in ("## Environment", "## Configurations", "## Card emulation", "## HTTP", "## Skipped"):
        assert heading in md
    assert "| 6gb | `--precision nf4 --offload vision,embeddings --lm-head-precision nf4` | ok |" in md
    assert "card emulation needs CUDA" in md
    assert _is_png(out / "memory.png") and _is_png(out / "tokens_per_s.png")
    for log in ("env.log", "config-bf16.log", "config-6gb.log", "compile-6gb.log", "serve.log"):
        assert (out / "logs" / log).is_file()


def test_gpu_check_skips_what_the_budget_cannot_hold(tmp_path, capsys):
    out = tmp_path / "gc"
    args = ["gpu-check", "--device", "cpu", "--synthetic", "tiny", "--budget-s", "0", "--out", str(out)]
    assert main(args) == 0
    rows = read_jsonl(out / "results.jsonl")[1:]
    assert [r["kind"] for r in rows] == ["environment"] + ["config"] * 6 + ["http", "http"]
    assert all(r["status"] == "skipped" and r["skipped_reason"].startswith("budget: ") for r in rows)
    assert [r["name"] for r in rows if r["kind"] == "config"] == gpu_check.DEFAULT_CONFIGS.split(",")
    md = (out / "results.md").read_text()
    assert "# gpu-check: cpu (environment not measured)" in md
    assert "- compile nf4: skipped: --compile is ignored on a CPU" in md
    assert (out / "memory.png").is_file() and (out / "tokens_per_s.png").is_file()


def test_gpu_check_refuses_bad_input(tmp_path, capsys):
    assert main(["gpu-check", "--configs", "nf4,fp8", "--out", str(tmp_path)]) == 2
    assert "--configs takes" in capsys.readouterr().err
    assert main(["gpu-check", "--batches", "0", "--out", str(tmp_path)]) == 2


def _fake_wheel(folder, name: str):
    """A minimal wheel of one module ``name`` (what pip --target needs: the module, METADATA, WHEEL, RECORD)."""
    dist = f"{name}-1.0.dist-info"
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}.py", "ANSWER = 42\n")
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return path


@pytest.mark.parametrize("pip_works", [True, False])
def test_missing_modules_are_installed_from_the_wheels(tmp_path, monkeypatch, pip_works):
    name = f"glm4v_gpu_check_probe_{int(pip_works)}"
    wheels, target = tmp_path / "whl", tmp_path / "site"
    wheels.mkdir()
    _fake_wheel(wheels, name)
    monkeypatch.setattr(gpu_check, "NEEDED", name)
    monkeypatch.setattr(sys, "path", list(sys.path))  # restored afterwards
    if not pip_works:  # an interpreter without pip: the wheels are unpacked by hand
        monkeypatch.setattr(gpu_check.sys, "executable", str(tmp_path / "no-python"))
    done = gpu_check.ensure_wheels(wheels, target)
    assert done["wheels_missing_before"] == [name] and done["wheels_missing_after"] == []
    assert done["wheels_installed"] == [f"{name}-1.0-py3-none-any.whl"] and sys.path[0] == str(target)
    assert ("wheels_pip_error" in done) is not pip_works
    assert __import__(name).ANSWER == 42
    assert gpu_check.child_env(done["wheels_target"])["PYTHONPATH"].split(":")[:2] == [str(target), str(gpu_check.ROOT)]
    again = gpu_check.ensure_wheels(wheels, target)  # importable now: nothing to do
    assert again["wheels_missing_before"] == [] and again["wheels_installed"] == []


def test_nothing_is_installed_when_everything_imports(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "NEEDED", "json")
    done = gpu_check.ensure_wheels(tmp_path / "none", tmp_path / "site")
    assert done["wheels_target"] is None and "nothing installed" in done["wheels_note"]
    assert not (tmp_path / "site").exists()


def test_card_claims_follow_the_estimator():
    """The full model's configurations claim ever smaller cards, and bf16 none of the emulated ones."""
    from quant.synthetic import synthetic_config

    config = synthetic_config("full")
    entries = 1000 + config.vision.image_tokens() + 16
    claims = {n: gpu_check.card_claim(config, n, [6, 8, 12, 16, 24], entries) for n in gpu_check.CONFIGS}
    assert claims["bf16"]["claimed_card_gib"] is None
    order = [claims[n]["claimed_card_gib"] for n in ("nf4+vision-bf16", "nf4", "8gb", "6gb")]
    assert order == sorted(order, reverse=True) and order[-1] <= 8
    for c in claims.values():
        if c["claimed_card_gib"] is not None:
            assert c["estimated_total_bytes"] <= c["claimed_card_gib"] * 2**30
    assert json.dumps(claims)  # plain JSON, as the rows are written
