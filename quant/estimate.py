"""Memory estimate for GLM-4V-9B at a precision, from ``config.json`` alone — before anyone downloads 28 GB.

Weights are counted tensor by tensor with the same part names as :func:`quant.memory.weight_bytes`, including
bitsandbytes' quantization state (nf4/fp4: 4 bits per weight + an fp32 absmax per 64 weights = 4.5 bits; with double
quantization the absmax is 8-bit plus an fp32 scale per 256 blocks ≈ 4.13 bits; int8: 8 bits + an fp32 scale per
output row). On top come the KV cache, the activation peak of the vision encoder and of the prompt prefill (SDPA
kernels, so no materialized attention matrix; bitsandbytes 4-bit dequantizes one weight at a time during prefill)
and the CUDA context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from glm4v.config import ChatGLMConfig

from . import PRECISIONS

FLOAT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
BLOCKSIZE_4BIT = 64
BLOCKSIZE_NESTED = 256
CUDA_CONTEXT_BYTES = 600 * 2**20  # CUDA context + cuBLAS workspace seen beside torch's allocator (NVML − torch)

# Decode needs few activations; the preallocated engine buffers are per token and tiny next to these.


@dataclass
class LinearSpec:
    part: str
    name: str
    in_features: int
    out_features: int
    bias: bool
    side: str  # "lm", "lm_head" or "vision"


def linear_layers(config: ChatGLMConfig) -> list[LinearSpec]:
    """Every nn.Linear of the network (the quantizable layers), grouped like the checkpoint."""
    c, v = config, config.vision
    h, f = c.hidden_size, c.ffn_hidden_size
    qkv_out = c.num_attention_heads * c.head_dim + 2 * c.num_kv_heads * c.head_dim
    out = []
    for i in range(c.num_layers):
        pre = f"transformer.encoder.layers.{i}"
        qkv_bias = c.add_bias_linear or c.add_qkv_bias
        out += [
            LinearSpec("lm_linears", f"{pre}.self_attention.query_key_value", h, qkv_out, qkv_bias, "lm"),
            LinearSpec(
                "lm_linears",
                f"{pre}.self_attention.dense",
                c.num_attention_heads * c.head_dim,
                h,
                c.add_bias_linear,
                "lm",
            ),
            LinearSpec("lm_linears", f"{pre}.mlp.dense_h_to_4h", h, 2 * f, c.add_bias_linear, "lm"),
            LinearSpec("lm_linears", f"{pre}.mlp.dense_4h_to_h", f, h, c.add_bias_linear, "lm"),
        ]
    out.append(LinearSpec("lm_head", "transformer.output_layer", h, c.padded_vocab_size, False, "lm_head"))
    for j in range(v.num_hidden_layers):
        pre = f"transformer.vision.transformer.layers.{j}"
        out += [
            LinearSpec(
                "vision_linears", f"{pre}.attention.query_key_value", v.hidden_size, 3 * v.hidden_size, True, "vision"
            ),
            LinearSpec("vision_linears", f"{pre}.attention.dense", v.hidden_size, v.hidden_size, True, "vision"),
            LinearSpec("vision_linears", f"{pre}.mlp.fc1", v.hidden_size, v.intermediate_size, True, "vision"),
            LinearSpec("vision_linears", f"{pre}.mlp.fc2", v.intermediate_size, v.hidden_size, True, "vision"),
        ]
    pre = "transformer.vision.linear_proj"
    out += [
        LinearSpec("projector", f"{pre}.linear_proj", h, h, False, "vision"),
        LinearSpec("projector", f"{pre}.dense_h_to_4h", h, f, False, "vision"),
        LinearSpec("projector", f"{pre}.gate_proj", h, f, False, "vision"),
        LinearSpec("projector", f"{pre}.dense_4h_to_h", f, h, False, "vision"),
    ]
    return out


def other_tensors(config: ChatGLMConfig) -> list[tuple[str, int, str]]:
    """(part, numel, side) of every non-Linear parameter: embeddings, norms, convs, position table, boi/eoi."""
    c, v = config, config.vision
    h = c.hidden_size
    out = [("embeddings", c.padded_vocab_size * h, "lm")]
    out += [("lm_norms", 2 * h * c.num_layers + h, "lm")]
    p = v.patch_size
    out += [
        ("vision_other", v.hidden_size * v.in_channels * p * p + v.hidden_size, "vision"),  # patch conv
        ("vision_other", v.hidden_size, "vision"),  # cls
        ("vision_other", v.num_positions * v.hidden_size, "vision"),  # position table
        ("vision_other", 4 * v.hidden_size * v.num_hidden_layers, "vision"),  # two LayerNorms (w, b) per layer
        ("projector", h * v.hidden_size * 4 + h, "vision"),  # 2×2 conv
        ("projector", 2 * h, "vision"),  # GLU LayerNorm
        ("projector", 2 * h, "vision"),  # boi, eoi
    ]
    return out


def parameter_count(config: ChatGLMConfig) -> int:
    n = sum(lin.in_features * lin.out_features + (lin.out_features if lin.bias else 0) for lin in linear_layers(config))
    return n + sum(numel for _, numel, _ in other_tensors(config))


def quantized_linear_bytes(precision: str, in_f: int, out_f: int, double_quant: bool) -> tuple[int, int]:
    """(weight bytes, quantization-state bytes) of one bitsandbytes Linear, bias excluded."""
    n = in_f * out_f
    if precision == "int8":
        return n, 4 * out_f  # int8 weight + fp32 scale per row
    blocks = math.ceil(n / BLOCKSIZE_4BIT)
    packed = math.ceil(n / 2)
    code = 16 * 4  # the 16-value 4-bit codebook, fp32, per layer
    if double_quant:
        nested = math.ceil(blocks / BLOCKSIZE_NESTED)
        state = blocks + 4 + nested * 4 + 256 * 4 + code  # uint8 absmax, offset, nested absmax, nested code
    else:
        state = blocks * 4 + code
    return packed, state


@dataclass
class Estimate:
    precision: str
    vision_precision: str
    dtype: str
    vision_size: int
    image_tokens: int
    context: int
    batch: int
    device: str
    weights: dict[str, int]
    kv_cache_bytes_per_token: int
    kv_cache_bytes: int
    activation: dict[str, int]
    cuda_context_bytes: int
    gpu_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def weights_bytes(self) -> int:
        return self.weights["total"]

    @property
    def activation_peak_bytes(self) -> int:
        return max(self.activation.values())

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_peak_bytes + self.cuda_context_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_bytes is None else self.total_bytes <= self.gpu_bytes

    def to_dict(self) -> dict:
        d = {
            "precision": self.precision,
            "vision_precision": self.vision_precision,
            "dtype": self.dtype,
            "vision_size": self.vision_size,
            "image_tokens": self.image_tokens,
            "context": self.context,
            "batch": self.batch,
            "device": self.device,
            "weights_bytes": self.weights_bytes,
            "kv_cache_bytes_per_token": self.kv_cache_bytes_per_token,
            "kv_cache_bytes": self.kv_cache_bytes,
            "activation_peak_bytes": self.activation_peak_bytes,
            "cuda_context_bytes": self.cuda_context_bytes,
            "total_bytes": self.total_bytes,
            "breakdown": {"weights": dict(self.weights), "activation": dict(self.activation)},
            "notes": list(self.notes),
        }
        if self.gpu_bytes is not None:
            d["gpu_bytes"] = self.gpu_bytes
            d["fits"] = self.fits
        return d


def _dtype_name(precision: str, vision_precision: str, compute_dtype: str | None) -> str:
    if compute_dtype:
        return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(compute_dtype, compute_dtype)
    for p in (precision, vision_precision):
        if p in FLOAT_BYTES:
            return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[p]
    return "bfloat16"


def estimate(
    config: ChatGLMConfig | None = None,
    precision: str = "bf16",
    vision_precision: str | None = None,
    vision_size: int | None = None,
    context: int = 2048,
    batch: int = 1,
    gpu_gb: float | None = None,
    compute_dtype: str | None = None,
    double_quant: bool = True,
    quantize_lm_head: bool = False,
    device: str = "cuda",
    prompt_tokens: int | None = None,
) -> Estimate:
    """Predict memory for one configuration. ``config`` defaults to the released GLM-4V-9B.

    ``context`` is the KV-cache length per sequence (prompt, image embeddings included, plus output), ``batch``
    the number of sequences sharing the GPU (their KV caches); the activation peaks are for one image and one
    prompt of ``prompt_tokens`` (default: one image + 512 text tokens, capped at ``context``), since the engine
    prefills one request at a time.
    """
    c = config or ChatGLMConfig()
    vision_precision = vision_precision or precision
    for p in (precision, vision_precision):
        if p not in PRECISIONS:
            raise ValueError(f"unknown precision {p!r}; choose one of {', '.join(PRECISIONS)}")
    dtype = _dtype_name(precision, vision_precision, compute_dtype)
    act_bytes = DTYPE_BYTES[dtype]
    lm_float = FLOAT_BYTES.get(precision, act_bytes)
    vision_float = FLOAT_BYTES.get(vision_precision, act_bytes)
    v = c.vision
    vision_size = vision_size or v.image_size

    weights = dict.fromkeys(
        (
            "lm_head",
            "embeddings",
            "lm_linears",
            "lm_norms",
            "vision_linears",
            "vision_other",
            "projector",
            "quant_state",
        ),
        0,
    )
    for lin in linear_layers(c):
        if lin.side == "lm":
            p, fb = precision, lm_float
        elif lin.side == "lm_head":
            p, fb = (precision if quantize_lm_head else None), lm_float
        else:
            p, fb = vision_precision, vision_float
        if p in ("int8", "nf4", "fp4"):
            w, s = quantized_linear_bytes(p, lin.in_features, lin.out_features, double_quant)
            weights[lin.part] += w + (lin.out_features * act_bytes if lin.bias else 0)
            weights["quant_state"] += s
        else:
            n = lin.in_features * lin.out_features + (lin.out_features if lin.bias else 0)
            weights[lin.part] += n * fb
    for part, numel, side in other_tensors(c):
        weights[part] += numel * (lm_float if side == "lm" else vision_float)
    weights["total"] = sum(weights.values())

    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * act_bytes
    img_tokens = v.image_tokens(vision_size)
    prompt = min(prompt_tokens or (img_tokens + 512), context)

    # Vision encoder: residual stream, fused QKV, attention output, MLP hidden before and after GELU.
    L = (vision_size // v.patch_size) ** 2 + 1
    # One image and one prompt at a time: the engine prefills requests one by one, so only the KV cache scales with
    # ``batch``, not these peaks.
    vis = L * (v.hidden_size * 5 + 2 * v.intermediate_size) * vision_float
    # Prefill: residual, QKV, attention output, fused gate/up, SwiGLU product, MLP output (one layer at a time).
    qkv = c.num_attention_heads * c.head_dim + 2 * c.num_kv_heads * c.head_dim
    pre = prompt * (3 * c.hidden_size + qkv + 3 * c.ffn_hidden_size) * act_bytes
    pre += c.padded_vocab_size * 4  # the last position's logits, fp32 for sampling
    dequant = 0
    if "nf4" in (precision, vision_precision) or "fp4" in (precision, vision_precision):
        dequant = c.hidden_size * 2 * c.ffn_hidden_size * act_bytes  # bnb dequantizes one weight for prefill
    activation = {"vision_encoder": vis + dequant, "prefill": pre + dequant}

    est = Estimate(
        precision=precision,
        vision_precision=vision_precision,
        dtype=dtype,
        vision_size=vision_size,
        image_tokens=img_tokens,
        context=context,
        batch=batch,
        device=device,
        weights=weights,
        kv_cache_bytes_per_token=kv_per_token,
        kv_cache_bytes=kv_per_token * context * batch,
        activation=activation,
        cuda_context_bytes=CUDA_CONTEXT_BYTES if device.startswith("cuda") else 0,
        gpu_bytes=int(gpu_gb * 2**30) if gpu_gb is not None else None,  # a "12 GB" card has 12 GiB
    )
    return est


def best_fitting(candidates: list[tuple[str, str | None]], gpu_bytes: int, **kw) -> tuple[str, str, Estimate] | None:
    """The first (precision, vision_precision) in ``candidates`` whose estimate fits ``gpu_bytes``."""
    for p, vp in candidates:
        est = estimate(precision=p, vision_precision=vp, **kw)
        est.gpu_bytes = gpu_bytes
        if est.fits:
            return p, vp or p, est
    return None


def max_context_that_fits(
    free_bytes: int,
    config: ChatGLMConfig,
    batch: int,
    precision: str,
    vision_precision: str | None = None,
    vision_size: int | None = None,
    prefill_tokens: int = 512,
    compute_dtype: str | None = None,
    headroom_bytes: int = 512 * 2**20,
) -> int:
    """The longest context (tokens per sequence) whose KV cache for ``batch`` sequences fits ``free_bytes`` — the
    memory left after the weights are loaded — while keeping room for the activation peak of a ``prefill_tokens``
    prefill chunk or of the vision encoder, and ``headroom_bytes`` for allocator fragmentation. Capped at the
    config's ``seq_length``; 0 when nothing fits."""
    est = estimate(
        config,
        precision=precision,
        vision_precision=vision_precision,
        vision_size=vision_size,
        context=prefill_tokens,
        prompt_tokens=prefill_tokens,
        compute_dtype=compute_dtype,
    )
    budget = free_bytes - est.activation_peak_bytes - headroom_bytes
    tokens = budget // (est.kv_cache_bytes_per_token * batch) if budget > 0 else 0
    return int(min(config.seq_length, tokens))


def serving_context(fits: int, seq_length: int) -> int:
    """The context a server configures from ``max_context_that_fits``: all of ``seq_length`` when it fits, else
    rounded down to a multiple of 256 tokens."""
    return fits if fits >= seq_length else fits // 256 * 256
