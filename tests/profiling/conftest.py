"""Shared runs of the real commands on the tiny checkpoint, made once per session and read by several tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def profile_out(tiny_dir, tmp_path_factory):
    """``glm4v-edge profile`` over fp16 (the baseline itself) and nf4, each in its own subprocess."""
    from glm4v_edge.cli import main

    out = tmp_path_factory.mktemp("profile")
    rc = main(
        [
            "profile",
            "--model",
            str(tiny_dir),
            "--precision",
            "fp16,nf4",
            "--new-tokens",
            "4",
            "--repeat",
            "2",
            "--prompt-tokens",
            "40",
            "--out",
            str(out),
        ]
    )
    return rc, out


@pytest.fixture(scope="session")
def eval_out(tiny_dir, tmp_path_factory):
    """``glm4v-edge eval`` of int8 and nf4 against fp32 on 10 synthetic items."""
    from glm4v_edge.cli import main

    out = tmp_path_factory.mktemp("eval")
    rc = main(
        [
            "eval",
            "--model",
            str(tiny_dir),
            "--precision",
            "int8,nf4",
            "--reference",
            "fp32",
            "--limit",
            "10",
            "--max-new-tokens",
            "8",
            "--out",
            str(out),
        ]
    )
    return rc, out
