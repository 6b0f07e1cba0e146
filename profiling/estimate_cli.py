"""Predict GPU memory for GLM-4V-9B at a precision from the config alone — before downloading 28 GB.

Weights per part (quantization state included: nf4 is 4.5 bits with its fp32 absmax, ~4.13 with double quant),
KV cache per token, activation peaks of the vision encoder and of the prefill, the CUDA context, the total, and —
with --gpu-gb — whether it fits and the most faithful configuration that does, as the flags to pass. With --offload
the weights are split into what stays on the GPU, the streaming buffer and what lives in host (pinned) memory, and the
PCIe traffic per image is set against a rough vision compute time.

Examples: glm4v-edge estimate --precision nf4 --vision-precision bf16 --gpu-gb 12
          glm4v-edge estimate --precision nf4 --vision-precision bf16 --offload vision,embeddings --gpu-gb 8
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
# Then the low-VRAM rungs (quant.fit.low_vram_rungs): the vision tower streamed from host memory and the
# embedding table on the host — vision bf16, then with an nf4 LM head, then vision nf4, then both.
GB = 1e9
GIB = 2**30  # --gpu-gb: a card sold as "12 GB" has 12 GiB, and nvidia-smi counts in MiB


def add_arguments(p) -> None:
    from quant import PRECISIONS

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
    p.add_argument(
        "--lm-head-precision",
        choices=PRECISIONS,
        help="LM head precision (default: 16-bit, the compute dtype); int8/nf4 save 0.6-0.9 GB",
    )
    p.add_argument("--quantize-lm-head", action="store_true", help="LM head at --precision (older spelling)")
    p.add_argument(
        "--offload",
        default="none",
        help="parts kept in host memory: vision (streamed per image), embeddings, both comma-separated, or none",
    )
    p.add_argument(
        "--host-gb",
        type=float,
        help="host RAM available (read as GiB): say whether the offloaded parts fit it (with a 2 GiB margin); the "
        "'best that fits' ladder skips what does not",
    )
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
    the weights and the CUDA context holds for --batch sequences (quant.fit.max_context_that_fits)."""
    from quant.fit import max_context_that_fits, serving_context

    free = est.gpu_bytes - est.gpu_weights_bytes - est.cuda_context_bytes
    fits = max_context_that_fits(
        free,
        cfg,
        est.batch,
        est.precision,
        est.vision_precision,
        est.vision_size,
        compute_dtype={"bfloat16": "bf16", "float16": "fp16"}.get(est.dtype, "fp32"),
        lm_head_precision=est.lm_head_precision,
    )
    return serving_context(fits, cfg.seq_length)


def _placement_words(est) -> str:
    if not est.offload:
        return "everything on the GPU"
    words = []
    if "vision" in est.offload:
        words.append(f"vision tower streamed from host memory through {est.stream_slots} GPU slots")
    if "embeddings" in est.offload:
        words.append("embedding table in host memory")
    return ", ".join(words)


def per_image_lines(est) -> list[str]:
    """PCIe traffic of one image against the vision compute: both estimates, said so."""
    from quant.estimate import ASSUMED_VISION_FLOPS_PER_S, PCIE_BYTES_PER_S, PCIE_LABELS

    compute = (
        f"vision compute ≈ {est.vision_flops_per_image / 1e12:.1f} TFLOP ≈ {est.vision_compute_s_per_image:.2f} s "
        f"at an assumed {ASSUMED_VISION_FLOPS_PER_S / 1e12:g} TFLOP/s (estimate)"
    )
    if not est.pcie_bytes_per_image:
        return [f"per image ({est.vision_size}px): no weights streamed (vision tower resident); {compute}"]
    transfer = ", ".join(
        f"{est.transfer_s_per_image[k]:.2f} s on {PCIE_LABELS[k]} ({bw / 1e9:g} GB/s)"
        for k, bw in PCIE_BYTES_PER_S.items()
    )
    return [
        f"per image ({est.vision_size}px): {est.pcie_bytes_per_image / GB:.3f} GB host→GPU over PCIe",
        f"  transfer: {transfer} (assumed effective pinned bandwidths; estimates)",
        f"  {compute}; the copy of unit i+1 overlaps the compute of unit i",
    ]


def describe(
    est,
    params: int,
    source: str,
    serve_ctx: int | None = None,
    host_gb: float | None = None,
    best_flags: str | None = None,
) -> str:
    from quant.fit import HOST_MARGIN_BYTES

    d = est.to_dict()
    w, a = d["breakdown"]["weights"], d["breakdown"]["activation"]
    vp = f", vision {est.vision_precision}" if est.vision_precision != est.precision else ""
    head = f", LM head {est.lm_head_precision}" if est.lm_head_precision else ""
    lines = [
        f"GLM-4V at {est.precision}{vp}{head} ({est.dtype} activations), vision {est.vision_size}px = "
        f"{est.image_tokens} image tokens, context {est.context} × batch {est.batch}, on {est.device}",
        f"config: {source}, {params:,} parameters",
        f"placement: {_placement_words(est)}",
        "weights (all of them, wherever they live)",
    ]
    lines += [f"  {k:<24}{_gb(v)}" for k, v in w.items() if k != "total" and v]
    lines.append(f"  {'total weights':<24}{_gb(w['total'])}")
    if est.offload:
        lines += [
            "where they live (host memory is pinned)",
            f"  {'GPU: resident':<24}{_gb(est.resident_weights_bytes)}",
            f"  {'GPU: streaming buffer':<24}{_gb(est.streaming_buffer_bytes)}"
            + (f"  ({est.stream_slots} slots × the largest vision unit)" if est.streaming_buffer_bytes else ""),
        ]
        lines += [f"  {'host: ' + k:<24}{_gb(n)}" for k, n in est.host.items()]
        lines.append(f"  {'host total':<24}{_gb(est.host_bytes)}")
    lines += [
        f"KV cache ({est.kv_cache_bytes_per_token / 1024:.1f} KiB/token × {est.context} × {est.batch})",
        f"  {'kv cache':<24}{_gb(est.kv_cache_bytes)}",
        "activation peak (the larger counts; they do not overlap)",
        f"  {'vision encoder':<24}{_gb(a['vision_encoder'])}",
        f"  {'prefill':<24}{_gb(a['prefill'])}",
        f"  {'decode step':<24}{_gb(a['decode'])}",
        f"{'CUDA context':<26}{_gb(est.cuda_context_bytes)}",
        f"{'TOTAL on the GPU' if est.offload else 'TOTAL':<26}{_gb(est.total_bytes)}",
    ]
    if est.offload:
        lines.append(f"{'in host memory':<26}{_gb(est.host_bytes)}")
    lines += per_image_lines(est)
    if host_gb is not None and est.host_bytes:
        need = est.host_bytes + HOST_MARGIN_BYTES
        ok = need <= host_gb * GIB
        lines.append(
            f"host {host_gb:g} GiB: {'yes' if ok else 'NO'} — {need / GIB:.2f} GiB needed "
            f"({est.host_bytes / GIB:.2f} GiB offloaded + {HOST_MARGIN_BYTES / GIB:g} GiB margin)"
        )
    if est.gpu_bytes is not None:
        room = est.gpu_bytes - est.total_bytes
        lines.append(
            f"fits {est.gpu_bytes / GIB:g} GiB: {'yes' if est.fits else 'NO'} "
            f"({abs(room) / GIB:.2f} GiB {'to spare' if room >= 0 else 'short'})"
            + (f", with: {est.flags()}" if est.fits else "")
            + (f"; the first configuration that fits: {best_flags}" if not est.fits and best_flags else "")
        )
        lines.append(
            f"serve without --max-model-len: up to {serve_ctx} tokens × {est.batch} sequences"
            if serve_ctx
            else "serve: no room left for a KV cache at this batch"
        )
    return "\n".join(lines)


def ladder():
    """The configurations "best that fits" tries, most faithful first."""
    from quant.fit import Rung, low_vram_rungs

    return [Rung(p, v) for p, v in FIT_CANDIDATES] + low_vram_rungs("bf16")


def best_that_fits(gpu_bytes: int, host_gb: float | None, **common):
    """The first rung of :func:`ladder` that fits the GPU (and, with --host-gb, the host); None if none does."""
    from quant.fit import HOST_MARGIN_BYTES

    for rung in ladder():
        est = rung.estimate(**common)
        est.gpu_bytes = gpu_bytes
        if est.fits and (host_gb is None or est.host_bytes + HOST_MARGIN_BYTES <= host_gb * GIB):
            return est
    return None


def run(args) -> int:
    from quant.estimate import estimate, parameter_count
    from quant.offload import parse_offload
    from quant.precision import check_precision

    try:
        if args.vision_precision:
            check_precision(args.vision_precision, "vision precision")
        offload = parse_offload(args.offload)
        config, source = _config(args)
        from glm4v import ChatGLMConfig

        cfg = config or ChatGLMConfig()
        if args.vision_size is not None:
            from quant.loader import check_vision_size

            check_vision_size(args.vision_size, cfg.vision.image_size)
        for name, n in (("--context", args.context), ("--batch", args.batch)):
            if n < 1:
                raise ValueError(f"{name} must be at least 1, got {n}")
        for name, x in (("--gpu-gb", args.gpu_gb), ("--host-gb", args.host_gb)):
            if x is not None and x <= 0:
                raise ValueError(f"{name} must be positive, got {x}")
        common = dict(
            config=cfg,
            vision_size=args.vision_size,
            context=args.context,
            batch=args.batch,
            compute_dtype=args.compute_dtype,
            double_quant=not args.no_double_quant,
            device=args.device,
            prompt_tokens=args.prompt_tokens,
        )
        ests = [
            estimate(
                precision=p,
                vision_precision=args.vision_precision,
                gpu_gb=args.gpu_gb,
                lm_head_precision=args.lm_head_precision,
                quantize_lm_head=args.quantize_lm_head,
                offload=offload,
                **common,
            )
            for p in args.precision
        ]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = parameter_count(cfg)
    best = None
    if args.gpu_gb is not None:
        pick = best_that_fits(int(args.gpu_gb * GIB), args.host_gb, **common)
        best = (
            None
            if pick is None
            else {
                "precision": pick.precision,
                "vision_precision": pick.vision_precision,
                "lm_head_precision": pick.lm_head_precision,
                "offload": list(pick.offload),
                "flags": pick.flags(),
                "total_bytes": pick.total_bytes,
                "host_bytes": pick.host_bytes,
            }
        )
    if args.json:
        docs = []
        for e in ests:
            d = e.to_dict()
            d["parameters"] = params
            d["config_source"] = source
            if args.host_gb is not None:
                from quant.fit import HOST_MARGIN_BYTES

                d["host_gb"] = args.host_gb
                d["host_fits"] = e.host_bytes + HOST_MARGIN_BYTES <= args.host_gb * GIB
            if args.gpu_gb is not None:
                d["best_fitting"] = best
                d["serve_max_model_len"] = serve_context(e, cfg)
            docs.append(d)
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
        return 0
    print(
        "\n\n".join(
            describe(
                e,
                params,
                source,
                serve_context(e, cfg) if args.gpu_gb is not None else None,
                args.host_gb,
                best["flags"] if best else None,
            )
            for e in ests
        )
    )
    if args.gpu_gb is not None:
        host = f" and {args.host_gb:g} GiB of host RAM" if args.host_gb is not None else ""
        if best is None:
            print(
                f"\nnothing fits {args.gpu_gb:g} GiB{host} at context {args.context} × batch {args.batch}, not even "
                "nf4 with the vision tower streamed and a 4-bit LM head: shorten the context, lower --vision-size or "
                "use a larger GPU"
            )
        else:
            where = f", {best['host_bytes'] / GIB:.2f} GiB in host memory" if best["host_bytes"] else ""
            print(
                f"\nbest that fits {args.gpu_gb:g} GiB{host}: {best['flags']} "
                f"({best['total_bytes'] / GIB:.2f} GiB estimated{where}; order tried: "
                + ", ".join(r.label() for r in ladder())
                + ")"
            )
    return 0
