"""Ask one question (optionally about one image) and stream the answer to the terminal.

Without --model it runs the shipped demo model (a small trained GLM-4V-architecture model, not GLM-4V-9B).
"""

from __future__ import annotations

import sys

from .options import add_model_arguments


def add_arguments(p) -> None:
    p.add_argument("question", help="the user message")
    p.add_argument("--image", help="image file (any format Pillow reads)")
    p.add_argument("--system", help="optional system message")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    add_model_arguments(p, env=False, precision_default="auto")


def run(args) -> int:
    import logging

    import torch

    from glm4v import ImageError, Message, SamplingParams, generation_prompt
    from glm4v.generate import generate
    from quant.request import LoadRequest, open_model

    log = logging.getLogger("glm4v_edge.chat")
    try:
        lm = open_model(LoadRequest.from_args(args))
    except ValueError as e:  # a missing folder or hub id, a refused precision: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    messages = []
    if args.system:
        messages.append(Message("system", args.system))
    messages.append(Message("user", args.question, has_image=bool(args.image)))
    prompt = generation_prompt(lm.tokenizer, messages)
    pixels = None
    if args.image:
        try:
            pixels = lm.image_processor(args.image)
        except (ImageError, FileNotFoundError) as e:
            print(f"error: {args.image}: {e}", file=sys.stderr)
            return 1
    params = SamplingParams(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    reason = None
    with torch.inference_mode():
        for step in generate(lm.model, lm.tokenizer, prompt.ids, pixels, params):
            sys.stdout.write(step.text)
            sys.stdout.flush()
            reason = step.finish_reason
    sys.stdout.write("\n")
    log.info("finish_reason=%s", reason)
    return 0
