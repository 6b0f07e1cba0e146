"""The engine with the low-VRAM placement (--offload vision,embeddings): every request of a mixed text/image batch,
prefilled in small chunks with the vision tower staged a layer at a time, gets exactly the greedy tokens the resident
model gives it alone — with the ordinary decode step and with the fixed-shape one (--compile's step, embeddings
looked up outside the graph)."""

from __future__ import annotations

import pytest
from PIL import Image

import quant
from engine import Engine, GenerationRequest
from glm4v import SamplingParams
from glm4v.generate import generate_text

from ..support import collect, prompt_ids

PARAMS = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def resident(load_tiny):
    return load_tiny("fp32")


@pytest.mark.parametrize("offload", [("vision",), ("embeddings",), ("vision", "embeddings")])
@pytest.mark.parametrize("decode_graphs", [None, "static", "aot_eager"])
def test_mixed_batch_with_chunked_prefill_equals_the_resident_model_alone(tiny_dir, resident, offload, decode_graphs):
    placed = quant.load(tiny_dir, precision="fp32", device="cpu", offload=offload)
    blue = placed.image_processor(Image.new("RGB", (90, 60), "blue"))
    red = placed.image_processor(Image.new("RGB", (30, 80), "red"))
    reqs = [
        (prompt_ids(placed, "describe the picture", image=True), blue),
        (prompt_ids(placed, "what colour is the shape in this image, answer in one word please"), None),
        (prompt_ids(placed, "count the squares", image=True), red),
        (prompt_ids(placed, "tell me a long story about the quick brown fox " * 2), None),
    ]
    eng = Engine(
        placed.model,
        placed.tokenizer,
        max_batch_size=4,
        max_model_len=256,
        prefill_chunk=8,
        vision_layers_per_step=1,
        decode_graphs=decode_graphs,
    ).start()
    try:
        handles = [eng.submit(GenerationRequest(ids, PARAMS, px)) for ids, px in reqs]
        results = [collect(h) for h in handles]
    finally:
        eng.shutdown(timeout=5)
    for (ids, px), (_, toks, reason) in zip(reqs, results, strict=True):
        _, alone, _ = generate_text(resident.model, resident.tokenizer, ids, px, PARAMS)
        assert toks == alone and reason == "length"
    streamer = getattr(placed.model.transformer.vision, "streamer", None)
    if streamer is not None:  # two images, each streamed exactly once, whatever the interleaving
        assert streamer.bytes_copied == 2 * streamer.host_bytes
        assert streamer.resident_units() == []
