"""Write a small random GLM-4V checkpoint in the exact official folder layout.

config.json with every official field, safetensors with the official key names, tokenizer.model (a small tiktoken
rank file), tokenizer_config.json with the real special tokens, generation_config.json. Deterministic for a seed.
Answers from it are random: it exists for tests, demos and benchmarks.
"""

from __future__ import annotations


def add_arguments(p) -> None:
    from glm4v.tiny import PRESETS

    p.add_argument("dir", help="output folder (created)")
    p.add_argument(
        "--preset",
        default="tiny",
        choices=sorted(PRESETS),
        help="tiny: hidden 64, 2 layers (tests); mid: hidden 1024, 8 layers (CPU benchmarks)",
    )
    p.add_argument("--image-size", type=int, help="vision image_size (a multiple of 28; tiny default 112)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1, help="split the weights into N safetensors shards + index")
    p.add_argument("--num-layers", type=int, help="override the language model depth")
    p.add_argument("--vision-layers", type=int, help="override the vision tower depth")


def run(args) -> int:
    from glm4v.checkpoint import inspect_checkpoint
    from glm4v.tiny import write_checkpoint

    out = write_checkpoint(
        args.dir,
        preset=args.preset,
        image_size=args.image_size,
        seed=args.seed,
        shards=args.shards,
        num_layers=args.num_layers,
        vision_layers=args.vision_layers,
    )
    info = inspect_checkpoint(out)
    print(f"wrote {out}: {info.num_parameters:,} parameters in {len(info.weight_files)} safetensors file(s)")
    return 0
