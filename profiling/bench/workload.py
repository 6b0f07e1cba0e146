"""The requests a benchmark sends: synthetic prompts of a given length, random-noise or file images, as OpenAI
chat-completion bodies (streaming, usage included, ``ignore_eos`` so every request produces ``max_tokens`` — or,
with ``--json-schema``, until its grammar is complete)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

WORDS = (
    "the quick brown fox jumps over a lazy dog while red green blue shapes count five small words in one "
    "picture of edge devices"
).split()


def synthetic_prompt(n_words: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    return "Describe this: " + " ".join(rng.choice(WORDS) for _ in range(n_words))


def synthetic_image_url(seed: int, size: int = 512) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def file_image_url(path: str) -> str:
    import mimetypes

    mime = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def response_format(args) -> dict | None:
    """``--json-schema FILE`` → the ``response_format`` every request sends (None without it)."""
    import json

    if not getattr(args, "json_schema", None):
        return None
    schema = json.loads(Path(args.json_schema).read_text())
    return {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema, "strict": True}}


def build_bodies(args, n: int, offset: int) -> list[dict]:
    bodies = []
    fmt = response_format(args)
    for i in range(n):
        seed = offset + i
        content = [{"type": "text", "text": synthetic_prompt(args.prompt_tokens, seed)}]
        if args.image:
            content.append({"type": "image_url", "image_url": {"url": file_image_url(args.image)}})
        elif args.synthetic_images:
            content.append({"type": "image_url", "image_url": {"url": synthetic_image_url(seed, args.image_side)}})
        bodies.append(
            {
                "model": args.model_name,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": True,  # vLLM's extension, also ours: every request produces max_tokens
            }
        )
        if fmt is not None:
            bodies[-1]["response_format"] = fmt
    return bodies
