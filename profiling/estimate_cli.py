"""Predict GPU memory for GLM-4V-9B at a precision from the config alone — before downloading 28 GB.

Weights per part (quantization state included: nf4 is 4.5 bits with its fp32 absmax, ~4.13 with double quant),
KV cache per token, activation peaks of the vision encoder and of the prefill, the CUDA context, the total, and —
with --gpu-gb — whether it fits and the most faithful configuration that does.

Example: glm4v-edge estimate --precision nf4 --vision-precision bf16 --gpu-gb 12
"""

from __future__ import annotations

import json
import sys

from .matrix import precision_list

# "Best that fits" tries these in order, most faithful first: int8 is near-lossless (llama.cpp's Q8 KL ≈ 2e-4),
# and keeping the vision tower in 16-bit protects the part where 4-bit hurts VLMs most (docs/MODEL.md §8.6).
FIT_CANDIDATES = [
    ("bf16", "bf16"),
    ("int8", "bf16"),
    ("int8", "int8"),
    ("nf4", "bf16"),
    ("nf4", "int8"),
    ("nf4", "nf4"),
]
GB = 1e9
GIB = 2**30  # --gpu-gb: a card sold as "12 GB" has 12 GiB, and nvidia-smi counts in MiB


def add_arguments(p) -> None:
    p.add_argument(
        "--precision",
        type=precision_list,
        default=precision_list("bf16"),
        help="language-model precision, or a comma list to compare (default bf16)",
    )
    p.add_argument("--vision-precision", help="vision tower precision (default: same as --precision)")
    p.add_argument("--vision-size", type=int, help="vision resolution, multiple of 28 up to 1120 (default 1120)")
    p.add_argument("--context", type=int, default=2048, help="KV-cache tokens per sequence (default 2048)")
    p.add_argument("--batch", type=int, default=1, help="sequences sharing the GPU (default 1)")
    p.add_argument(
        "--prompt-tokens",
        type=int,
        help="prefill length for the activation peak (default: one image + 512 text tokens)",
    )
    p.add_argument(
        "--gpu-gb",
        type=float,
        help="GPU memory as sold (12 for a 12 GB card, read as GiB): say whether it fits, and what does",
    )
    p.add_argument("--compute-dtype", choices=("bf16", "fp16", "fp32"), help="activation dtype (default bf16)")
    p.add_argument("--no-double-quant", action="store_true", help="4-bit: fp32 absmax (4.5 bits, not ~4.13)")
    p.add_argument("--quantize-lm-head", action="store_true", help="also quantize the LM head")
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cuda adds the CUDA context (default cuda)"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="read config.json from this checkpoint folder (default: released GLM-4V-9B)")
    src.add_argument("--config", help="a config.json file (default: released GLM-4V-9B)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _config(args):
    from glm4v.checkpoint import load_config
    from quant.synthetic import synthetic_config

    if args.model:
        return load_config(args.model), args.model
    if args.config:
        return synthetic_config(args.config), args.config
    return None, "released GLM-4V-9B config"


def _gb(n: int) -> str:
    return f"{n / GB:8.3f} GB {n / 2**30:8.3f} GiB"


def serve_context(est, cfg) -> int:
    """The context `glm4v-edge serve` would pick on this card without --max-model-len: what the memory left after
    the weights and the CUDA context holds for --batch sequences (quant.estimate.max_context_that_fits)."""
    from quant.estimate import max_context_that_fits, serving_context

    free = est.gpu_bytes - est.weights_bytes - est.cuda_context_bytes
    fits = max_context_that_fits(
        free,
        cfg,
        est.batch,
        est.precision,
        est.vision_precision,
        est.vision_size,
        compute_dtype={"bfloat16": "bf16", "float16": "fp16"}.get(est.dtype, "fp32"),
    )
    return serving_context(fits, cfg.seq_length)


def describe(est, params: int, source: str, serve_ctx: int | None = None) -> str:
    d = est.to_dict()
    w, a = d["breakdown"]["weights"], d["breakdown"]["activation"]
    vp = f", vision {est.vision_precision}" if est.vision_precision != est.precision else ""
    lines = [
        f"GLM-4V at {est.precision}{vp} ({est.dtype} activations), vision {est.vision_size}px = "
        f"{est.image_tokens} image tokens, context {est.context} × batch {est.batch}, on {est.device}",
        f"config: {source}, {params:,} parameters",
        "weights",
    ]
    lines += [f"  {k:<24}{_gb(v)}" for k, v in w.items() if k != "total" and v]
    lines += [
        f"  {'total weights':<24}{_gb(w['total'])}",
        f"KV cache ({est.kv_cache_bytes_per_token / 1024:.1f} KiB/token × {est.context} × {est.batch})",
        f"  {'kv cache':<24}{_gb(est.kv_cache_bytes)}",
        "activation peak (the larger counts; they do not overlap)",
        f"  {'vision encoder':<24}{_gb(a['vision_encoder'])}",
        f"  {'prefill':<24}{_gb(a['prefill'])}",
        f"{'CUDA context':<26}{_gb(est.cuda_context_bytes)}",
        f"{'TOTAL':<26}{_gb(est.total_bytes)}",
    ]
    if est.gpu_bytes is not None:
        room = est.gpu_bytes - est.total_bytes
        lines.append(
            f"fits {est.gpu_bytes / GIB:g} GiB: {'yes' if est.fits else 'NO'} "
            f"({abs(room) / GIB:.2f} GiB {'to spare' if room >= 0 else 'short'})"
        )
        lines.append(
            f"serve without --max-model-len: up to {serve_ctx} tokens × {est.batch} sequences"
            if serve_ctx
            else "serve: no room left for a KV cache at this batch"
        )
    return "\n".join(lines)


def run(args) -> int:
    from quant.estimate import best_fitting, estimate, parameter_count
    from quant.precision import check_precision

    try:
        if args.vision_precision:
            check_precision(args.vision_precision, "vision precision")
        config, source = _config(args)
        from glm4v import ChatGLMConfig

        cfg = config or ChatGLMConfig()
        if args.vision_size is not None:
            from quant.loader import check_vision_size

            check_vision_size(args.vision_size, cfg.vision.image_size)
        for name, n in (("--context", args.context), ("--batch", args.batch)):
            if n < 1:
                raise ValueError(f"{name} must be at least 1, got {n}")
        if args.gpu_gb is not None and args.gpu_gb <= 0:
            raise ValueError(f"--gpu-gb must be positive, got {args.gpu_gb}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    common = dict(
        config=cfg,
        vision_size=args.vision_size,
        context=args.context,
        batch=args.batch,
        compute_dtype=args.compute_dtype,
        double_quant=not args.no_double_quant,
        quantize_lm_head=args.quantize_lm_head,
        device=args.device,
        prompt_tokens=args.prompt_tokens,
    )
    ests = [
        estimate(precision=p, vision_precision=args.vision_precision, gpu_gb=args.gpu_gb, **common)
        for p in args.precision
    ]
    params = parameter_count(cfg)
    best = None
    if args.gpu_gb is not None:
        pick = best_fitting(FIT_CANDIDATES, int(args.gpu_gb * GIB), **common)
        best = (
            None
            if pick is None
            else {
                "precision": pick[0],
                "vision_precision": pick[1],
                "total_bytes": pick[2].total_bytes,
            }
        )
    if args.json:
        docs = []
        for e in ests:
            d = e.to_dict()
            d["parameters"] = params
            d["config_source"] = source
            if args.gpu_gb is not None:
                d["best_fitting"] = best
                d["serve_max_model_len"] = serve_context(e, cfg)
            docs.append(d)
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
        return 0
    print(
        "\n\n".join(
            describe(e, params, source, serve_context(e, cfg) if args.gpu_gb is not None else None) for e in ests
        )
    )
    if args.gpu_gb is not None:
        if best is None:
            print(
                f"\nnothing fits {args.gpu_gb:g} GiB at context {args.context} × batch {args.batch}, "
                "not even nf4: shorten the context, lower --vision-size or use a larger GPU"
            )
        else:
            vp = best["vision_precision"]
            vp = "" if vp == best["precision"] else f" --vision-precision {vp}"
            print(
                f"\nbest that fits {args.gpu_gb:g} GiB: --precision {best['precision']}{vp} "
                f"({best['total_bytes'] / GIB:.2f} GiB estimated; order tried: "
                + ", ".join(p if p == v else f"{p}+vision-{v}" for p, v in FIT_CANDIDATES)
                + ")"
            )
    return 0
