"""Shared fixtures: one tiny checkpoint per test session, in the official layout, and models loaded from it."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from glm4v.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sharded_dir(tmp_path_factory):
    from glm4v.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-sharded", preset="tiny", seed=0, shards=3)


_loaded = {}


@pytest.fixture(scope="session")
def load_tiny(tiny_dir):
    """load_tiny(precision, vision_precision=None, **kw) → quant.LoadedModel, cached per argument set."""
    import quant

    def _load(precision="fp32", vision_precision=None, **kw):
        key = (precision, vision_precision, tuple(sorted(kw.items())))
        if key not in _loaded:
            _loaded[key] = quant.load(tiny_dir, precision=precision, vision_precision=vision_precision,
                                      device="cpu", **kw)
        return _loaded[key]

    return _load


@pytest.fixture(scope="session")
def tiny_fp32(load_tiny):
    return load_tiny("fp32")


@pytest.fixture(scope="session")
def red_image():
    from PIL import Image

    return Image.new("RGB", (200, 120), (220, 30, 30))


def pytest_configure(config):
    logging.getLogger("transformers").setLevel(logging.ERROR)
