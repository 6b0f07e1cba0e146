"""One description of what to load (LoadRequest), one function that opens it (open_model)."""

from __future__ import annotations

import argparse

import pytest
import torch

import quant.auto
from glm4v_edge.options import add_model_arguments
from quant.estimate import estimate
from quant.request import AUTO_CONTEXT, LoadRequest, open_model


def parsed(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_model_arguments(p, env=False)
    return p.parse_args(argv)


def test_from_args_reads_every_model_flag():
    args = parsed(
        [
            "--model",
            "/m",
            "--precision",
            "nf4",
            "--vision-precision",
            "bf16",
            "--compute-dtype",
            "fp16",
            "--no-double-quant",
            "--vision-size",
            "560",
            "--device",
            "cpu",
        ]
    )
    r = LoadRequest.from_args(args, batch=8)
    assert r == LoadRequest(
        model="/m",
        precision="nf4",
        vision_precision="bf16",
        compute_dtype="fp16",
        double_quant=False,
        vision_size=560,
        device="cpu",
        batch=8,
    )
    with pytest.raises(AttributeError):  # frozen: built once, never mutated on its way through
        r.precision = "int8"


def test_open_model_loads_a_folder_and_builds_synthetic_weights(tiny_dir):
    lm = open_model(LoadRequest(model=str(tiny_dir), precision="fp32", device="cpu"))
    assert lm.spec.precision == "fp32" and not lm.demo and lm.device == torch.device("cpu")
    syn = open_model(LoadRequest(synthetic="tiny", precision="bf16", device="cpu", vision_size=56))
    assert syn.demo and syn.vision_size == 56 and syn.spec.precision == "bf16"
    assert str(syn.model_dir) == "synthetic/tiny"


def test_open_model_without_a_source_is_the_shipped_demo_model_said_loudly(caplog):
    from glm4v.tiny import DEMO_MODEL_DIR

    lm = open_model(LoadRequest(precision="fp32", device="cpu"))
    assert lm.demo and lm.model_dir == DEMO_MODEL_DIR and lm.vision_size == 112
    assert "built-in DEMO model" in caplog.text and "NOT GLM-4V-9B" in caplog.text


@pytest.mark.parametrize("context,batch,expected", [(None, 1, AUTO_CONTEXT), (4096, 8, 4096)])
def test_auto_is_decided_once_with_the_requests_context_and_batch(tiny_dir, monkeypatch, context, batch, expected):
    seen = {}

    def fake(config, device, vision_size=None, context=2048, batch=1):
        seen.update(device=device, vision_size=vision_size, context=context, batch=batch)
        return "fp32", "test"

    monkeypatch.setattr(quant.auto, "choose_precision", fake)
    r = LoadRequest(model=str(tiny_dir), device="cpu", vision_size=56, context=context, batch=batch).resolve()
    assert r.precision == "fp32" and r.device == "cpu"
    # the tiny checkpoint's seq_length (2048) caps the default context
    assert seen == dict(
        device=torch.device("cpu"),
        vision_size=56,
        context=min(expected, 2048) if context is None else expected,
        batch=batch,
    )


def test_estimate_is_made_for_exactly_the_request(tiny_dir):
    r = LoadRequest(
        model=str(tiny_dir),
        precision="nf4",
        vision_precision="bf16",
        vision_size=56,
        context=512,
        batch=4,
        double_quant=False,
    )
    config = r.config()
    assert (
        r.estimate().total_bytes
        == estimate(
            config, precision="nf4", vision_precision="bf16", vision_size=56, context=512, batch=4, double_quant=False
        ).total_bytes
    )
    with pytest.raises(ValueError, match="resolve"):
        LoadRequest(model=str(tiny_dir)).estimate()
