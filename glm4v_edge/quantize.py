"""Write a pre-quantized checkpoint: quantize once, start fast (and download ~9 GB instead of 28 GB) ever after.

    glm4v-edge quantize --model THUDM/glm-4v-9b --precision nf4 --out ~/models/glm-4v-9b-nf4
    glm4v-edge serve --model ~/models/glm-4v-9b-nf4          # --precision auto takes what the folder holds

The folder holds safetensors with the packed bitsandbytes weights and their quantization state, ``config.json``
with its ``quantization_config`` (so ``transformers`` + bitsandbytes load it too), the tokenizer and generation
files. The vision tower is written at the language model's method or in 16-bit (``--vision-precision bf16``).
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger("glm4v_edge.quantize")


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="the bf16 checkpoint: a folder or a hub id (THUDM/glm-4v-9b)")
    p.add_argument("--precision", required=True, choices=("nf4", "int8", "fp4"), help="bitsandbytes method")
    p.add_argument(
        "--vision-precision",
        choices=("nf4", "int8", "fp4", "bf16", "fp16"),
        help="the vision tower: --precision's method (default) or left in 16-bit",
    )
    p.add_argument("--lm-head-precision", choices=("nf4", "int8", "fp4"), help="also quantize the LM head")
    p.add_argument("--compute-dtype", choices=("bf16", "fp16", "fp32"), help="dtype of the unquantized tensors")
    p.add_argument("--no-double-quant", action="store_true", help="4-bit: keep absmax statistics in fp32")
    p.add_argument("--device", help="where to quantize: cuda (fast) or cpu (default: cuda when available)")
    p.add_argument("--out", required=True, help="new folder for the pre-quantized checkpoint")
    p.add_argument("--json", action="store_true", help="machine-readable summary")


def run(args) -> int:
    from glm4v.checkpoint import CheckpointError
    from quant.loader import load
    from quant.prequantized import save_quantized
    from quant.request import LoadRequest

    request = LoadRequest.from_args(args, offload=())
    try:
        model_dir = request.model_dir()
        lm = load(
            model_dir,
            precision=args.precision,
            vision_precision=args.vision_precision,
            lm_head_precision=args.lm_head_precision,
            compute_dtype=args.compute_dtype,
            double_quant=not args.no_double_quant,
            device=args.device,
        )
        if lm.prequantized:
            raise ValueError(f"{model_dir} is already pre-quantized: quantize the bf16 original")
        written = save_quantized(lm, args.out, source=args.model)
    except (CheckpointError, ValueError) as e:
        log.error("%s", e)
        return 2
    from quant.estimate import estimate

    est = estimate(
        lm.config,
        precision=lm.spec.precision,
        vision_precision=lm.spec.vision_precision,
        lm_head_precision=lm.spec.lm_head_precision,
        double_quant=lm.spec.double_quant,
    )
    summary = {
        "out": written["path"],
        "holds": written["held"].label(),
        "files": written["files"],
        "weight_bytes_on_disk": written["weight_bytes_on_disk"],
        "estimated_weight_bytes": est.weights["total"],
        "load_and_quantize_s": round(lm.load_s, 1),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"wrote {summary['out']}: {summary['holds']}, {summary['weight_bytes_on_disk'] / 2**30:.2f} GiB of "
            f"weights (estimate {summary['estimated_weight_bytes'] / 2**30:.2f} GiB), quantized in "
            f"{summary['load_and_quantize_s']} s\n  serve it: glm4v-edge serve --model {summary['out']}"
        )
    return 0
