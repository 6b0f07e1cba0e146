"""Check a checkpoint folder (config, files, every weight name and shape) without loading it, and summarise it."""

from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    from glm4v.checkpoint import CheckpointError, inspect_checkpoint
    from quant.prequantized import check_keys, held_quantization

    try:
        held = held_quantization(args.model)
        info = inspect_checkpoint(args.model, check_keys=held is None)
        if held is not None:
            info = check_keys(info)
    except CheckpointError as e:
        print(f"error: {e}")
        return 1
    disk = sum(p.stat().st_size for p in info.weight_files)
    c = info.config
    v = c.vision
    summary = {
        "path": str(info.path),
        "parameters": info.num_parameters,
        "weight_files": [p.name for p in info.weight_files],
        "dtypes": sorted(set(info.dtypes.values())),
        "weight_bytes_on_disk": disk,
        "prequantized": None if held is None else held.label(),
        "language_model": {
            "layers": c.num_layers,
            "hidden_size": c.hidden_size,
            "heads": c.num_attention_heads,
            "kv_groups": c.num_kv_heads,
            "ffn_hidden_size": c.ffn_hidden_size,
            "vocab": c.padded_vocab_size,
            "seq_length": c.seq_length,
            "rope_base": c.rope_base,
        },
        "vision": {
            "layers": v.num_hidden_layers,
            "hidden_size": v.hidden_size,
            "heads": v.num_heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "image_tokens": v.image_tokens(),
        },
        "token_ids": {"eos": c.eos_token_ids, "pad": c.pad_token_id, "boi": c.boi_token_id, "eoi": c.eoi_token_id},
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{info.path}: OK, {info.num_parameters:,} parameters ({', '.join(summary['dtypes'])})")
        kind = f"pre-quantized {held.label()}" if held else "float (quantized while loading)"
        print(f"  weights: {disk / 2**30:.2f} GiB on disk, {kind}")
        for k in ("language_model", "vision", "token_ids"):
            print(f"  {k}: " + ", ".join(f"{a}={b}" for a, b in summary[k].items()))
    return 0
