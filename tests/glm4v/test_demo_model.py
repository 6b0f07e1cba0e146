"""The shipped demo model (glm4v/demo_model) is a checkpoint of the exact GLM-4V layout, small, documented by its
training record, and what the training script makes: seeded and deterministic."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from glm4v.checkpoint import load_config
from glm4v.tiny import DEMO_MODEL_DIR, demo_model_dir, make_config, random_state_dict

REPO = Path(__file__).resolve().parents[2]
OFFICIAL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.model",
    "tokenizer_config.json",
)


def test_the_demo_model_is_shipped_small_and_in_the_official_layout():
    d = demo_model_dir()
    for name in OFFICIAL_FILES:
        assert (d / name).is_file(), name
    total = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
    assert total <= 20 * 2**20, f"{total / 2**20:.1f} MiB"
    raw = json.loads((d / "config.json").read_text())
    # Every field of the official config.json (as make_config writes it), at the demo's sizes.
    assert set(raw) == set(make_config("tiny"))
    assert raw["vision_config"]["image_size"] == 112 and raw["torch_dtype"] == "bfloat16"
    config = load_config(d)
    expected = random_state_dict(raw, seed=0, dtype=torch.float32)  # names and shapes of the real model class
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert keys == set(expected)
        for k in keys:
            t = f.get_slice(k)
            assert list(t.get_shape()) == list(expected[k].shape), k
            assert t.get_dtype() == "BF16", k
    assert config.vision.image_tokens() == 18  # (112 / 28)² + boi + eoi


def test_the_training_record_states_time_size_and_held_out_accuracy():
    rec = json.loads((DEMO_MODEL_DIR / "training.json").read_text())
    assert rec["train_seconds"] <= 30 * 60
    assert 3e6 < rec["parameters"] < 10e6
    held = rec["held_out_fp32"]
    assert set(held["by_kind"]) == {"colour", "shape", "count", "position", "size", "word", "clock", "chart"}
    assert held["accuracy"] > 0.6  # chance is about 0.2 (1/7 colours, 1/3 shapes, 1/4 counts, ...)
    # What the E2E test and the README rest on, far above chance (1/7, 1/3, 1/4, 1/4).
    kinds = held["by_kind"]
    assert kinds["colour"] >= 0.95 and kinds["shape"] >= 0.75 and kinds["position"] >= 0.75 and kinds["count"] >= 0.5


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_training_script_is_seeded_and_deterministic(tmp_path):
    train_demo = _train_demo()
    args = ["--steps", "3", "--batch", "3", "--eval-items", "0", "--log-every", "1"]
    torch_threads = torch.get_num_threads()
    try:
        for run in ("a", "b"):
            assert train_demo.main(args + ["--out", str(tmp_path / run)]) == 0
        assert train_demo.main(args + ["--out", str(tmp_path / "c"), "--seed", "1"]) == 0
    finally:
        torch.set_num_threads(torch_threads)
        torch.use_deterministic_algorithms(False)
    assert _sha(tmp_path / "a" / "model.safetensors") == _sha(tmp_path / "b" / "model.safetensors")
    assert _sha(tmp_path / "a" / "model.safetensors") != _sha(tmp_path / "c" / "model.safetensors")
    # It writes the shipped layout: same files, same tokenizer, same config.
    for name in OFFICIAL_FILES:
        assert (tmp_path / "a" / name).is_file()
    assert _sha(tmp_path / "a" / "tokenizer.model") == _sha(DEMO_MODEL_DIR / "tokenizer.model")
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == json.loads(
        (DEMO_MODEL_DIR / "config.json").read_text()
    )
    # The auxiliary heads are training scaffolding: the checkpoint holds the official keys and nothing else.
    with (
        safe_open(tmp_path / "a" / "model.safetensors", "pt") as a,
        safe_open(DEMO_MODEL_DIR / "model.safetensors", "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())


def _train_demo():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import train_demo
    finally:
        sys.path.pop(0)
    return train_demo


def test_the_auxiliary_labels_name_what_each_picture_shows():
    import random

    from profiling.vqa_demo import demo_item

    td = _train_demo()
    rng = random.Random(3)
    pos = demo_item("position", rng)
    t = td.aux_targets(pos.meta)
    assert set(t) == {"position", "shape", "colour"}
    assert td.AUX_LABELS["position"][t["position"]] == pos.meta["value"]
    assert td.AUX_LABELS["shape"][t["shape"]] == pos.meta["shape"]
    count = demo_item("count", rng)
    assert td.AUX_LABELS["count"][td.aux_targets(count.meta)["count"]] == count.meta["value"]
    assert set(td.aux_targets(demo_item("clock", rng).meta)) == set()  # nothing a linear head is asked about


@pytest.mark.parametrize("where", ["left", "right", "top", "bottom"])
def test_the_per_token_labels_mark_the_tokens_that_hold_the_shape(where):
    """A shape drawn at one edge: its ink falls in that edge's row or column of the 4×4 token grid, and those tokens
    (only) carry its shape label; the rest are background."""
    import torch

    from glm4v import ImageProcessor
    from profiling.vqa_demo import SHAPES, draw_position

    td = _train_demo()
    proc = ImageProcessor(td.IMAGE_SIZE)
    heads = td.AuxHeads(16, proc.mean, proc.std)
    for seed in range(6):
        shape = SHAPES[seed % 3]
        pixels = proc(draw_position(shape, "black", where, seed))[None]
        grid = heads.token_labels(pixels, torch.tensor([SHAPES.index(shape)]), 16).view(4, 4)
        marked = grid != len(SHAPES)
        assert marked.any() and (grid[marked] == SHAPES.index(shape)).all()
        edge = {"left": marked[:, 0], "right": marked[:, 3], "top": marked[0], "bottom": marked[3]}[where]
        assert edge.any()
        opposite = {"left": marked[:, 3], "right": marked[:, 0], "top": marked[3], "bottom": marked[0]}[where]
        assert not opposite.any()


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_a_missing_demo_model_is_a_clear_error(tmp_path, monkeypatch, missing):
    import shutil

    from glm4v import tiny

    fake = tmp_path / "demo_model"
    shutil.copytree(DEMO_MODEL_DIR, fake)
    (fake / missing).unlink()
    monkeypatch.setattr(tiny, "DEMO_MODEL_DIR", fake)
    with pytest.raises(FileNotFoundError, match="demo model is missing"):
        tiny.demo_model_dir()
