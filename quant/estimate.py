"""Memory estimate for GLM-4V-9B at a precision, from ``config.json`` alone — before anyone downloads 28 GB.

Weights are counted tensor by tensor with the same part names as :func:`quant.memory.weight_bytes`, including
bitsandbytes' quantization state (nf4/fp4: 4 bits per weight + an fp32 absmax per 64 weights = 4.5 bits; with double
quantization the absmax is 8-bit plus an fp32 scale per 256 blocks ≈ 4.13 bits; int8: 8 bits + an fp32 scale per
output row). On top come the KV cache, the activation peak of the vision encoder and of the prompt prefill (SDPA
kernels, so no materialized attention matrix; a bitsandbytes 4-bit layer fed many rows may dequantize its weight into
a temporary) and the CUDA context.

Low-VRAM placement (:mod:`quant.offload`) is predicted to the byte too: with ``offload=("vision",)`` the vision tower's
units (patch embedding, each ViT layer, the 2×2 conv, each GLU Linear) are packed into host memory — every tensor on a
256-byte boundary — and streamed through ``stream_slots`` device buffers of the largest unit's size; with
``"embeddings"`` the input table stays on the host. The estimate then splits the weights into what the GPU holds
(``resident_weights_bytes`` + ``streaming_buffer_bytes``) and what the host holds (``host_bytes``), and says what one
image costs on the PCIe bus and, roughly, in vision compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from glm4v.config import ChatGLMConfig

from . import PRECISIONS

FLOAT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
QUANTIZED = ("int8", "nf4", "fp4")
BLOCKSIZE_4BIT = 64
BLOCKSIZE_NESTED = 256
CUDA_CONTEXT_BYTES = 600 * 2**20  # CUDA context + cuBLAS workspace seen beside torch's allocator (NVML − torch)
# bitsandbytes' 4-bit matmul runs its fused kernel up to this many rows; past it, it may dequantize the whole weight
# into a temporary in the compute dtype and call F.linear (bitsandbytes.backends.cuda.ops, _GEMM_4BIT_CUSTOM_FLOOR_M).
BNB_4BIT_FUSED_MAX_ROWS = 4

# Streaming (quant.offload): tensors packed on 256-byte boundaries (= quant.offload.ALIGN), two device slots by default.
HOST_ALIGN = 256
STREAM_SLOTS = 2
# Effective pinned host→device copy bandwidth of an x16 link, ESTIMATES (not measured here): PCIe 3.0 x16 is 15.75 GB/s
# and 4.0 x16 31.5 GB/s on paper; pinned cudaMemcpyAsync typically reaches ~75–80 % of that.
PCIE_BYTES_PER_S = {"pcie3_x16": 12e9, "pcie4_x16": 24e9}
PCIE_LABELS = {"pcie3_x16": "PCIe 3.0 x16", "pcie4_x16": "PCIe 4.0 x16"}
# ASSUMED achieved bf16 matmul throughput of the vision encoder on an 8 GB consumer card (RTX 3070 / 4060 class:
# ~15–40 dense TFLOP/s peak with fp32 accumulation). An estimate for comparing against the PCIe time, not a measurement.
ASSUMED_VISION_FLOPS_PER_S = 20e12

# Decode needs few activations (the logits; a 4-bit layer's dequantized weight only past BNB_4BIT_FUSED_MAX_ROWS
# sequences); the preallocated engine buffers are per token and tiny next to these.


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


def linear_tensor_bytes(
    precision: str | None, lin: LinearSpec, float_bytes: int, act_bytes: int, double_quant: bool
) -> tuple[list[int], list[int]]:
    """Bytes of each tensor of one Linear as loaded: (parameters [weight, bias], quantization-state tensors).
    ``precision`` None or a float name = a float layer of ``float_bytes``; a bitsandbytes layer keeps its bias in the
    compute dtype (``act_bytes``)."""
    n, out = lin.in_features * lin.out_features, lin.out_features
    if precision not in QUANTIZED:
        return [n * float_bytes] + ([out * float_bytes] if lin.bias else []), []
    params = [quantized_linear_bytes(precision, lin.in_features, out, double_quant)[0]]
    params += [out * act_bytes] if lin.bias else []
    if precision == "int8":
        return params, [4 * out]  # SCB: an fp32 scale per row
    blocks = math.ceil(n / BLOCKSIZE_4BIT)
    if not double_quant:
        return params, [blocks * 4, 16 * 4]  # fp32 absmax, the 16-entry fp32 codebook
    nested = math.ceil(blocks / BLOCKSIZE_NESTED)
    # uint8 absmax, codebook, fp32 offset, then the nested state: fp32 absmax per 256 blocks, 256-entry fp32 code
    return params, [blocks, 16 * 4, 4, nested * 4, 256 * 4]


def _align(n: int) -> int:
    return -(-n // HOST_ALIGN) * HOST_ALIGN


def vision_units(
    config: ChatGLMConfig, vision_precision: str, vision_float: int, act_bytes: int, double_quant: bool
) -> dict[str, list[int]]:
    """{unit: bytes of each tensor} of the streamed vision tower, in :class:`quant.offload.VisionStreamer`'s units
    (patch embedding, the ViT layers, the 2×2 conv, the four GLU Linears); ``boi``, ``eoi`` and the GLU's LayerNorm
    are not in any unit (they stay resident)."""
    c, v = config, config.vision
    d, h, p = v.hidden_size, c.hidden_size, v.patch_size
    fb = vision_float
    units = {"patch_embedding": [d * fb, d * v.in_channels * p * p * fb, d * fb, v.num_positions * d * fb]}
    for j in range(v.num_hidden_layers):
        units[f"transformer.layers.{j}"] = [d * fb] * 4  # the two LayerNorms' weights and biases
    units["conv"] = [h * d * 4 * fb, h * fb]
    for lin in linear_layers(c):
        if lin.side == "vision":
            rest = lin.name.removeprefix("transformer.vision.")
            unit = ".".join(rest.split(".")[:3]) if rest.startswith("transformer.layers.") else rest
            params, state = linear_tensor_bytes(vision_precision, lin, fb, act_bytes, double_quant)
            units.setdefault(unit, []).extend(params + state)
    return units


def vision_flops(config: ChatGLMConfig, vision_size: int | None = None) -> int:
    """Multiply-add FLOPs (2 per MAC) of one image through the vision tower and the GLU projector: the patch conv,
    per ViT layer the four Linears and the two attention products (QKᵀ and AV), the 2×2 conv, the GLU. Norms, GELU and
    softmax are left out (a few %)."""
    c, v = config, config.vision
    d, i, h, f = v.hidden_size, v.intermediate_size, c.hidden_size, c.ffn_hidden_size
    g = (vision_size or v.image_size) // v.patch_size
    tokens, merged = g * g + 1, (g // 2) ** 2
    patch = 2 * g * g * v.in_channels * v.patch_size**2 * d
    layer = 2 * tokens * (4 * d * d + 2 * d * i) + 4 * tokens * tokens * d
    conv = 2 * merged * 4 * d * h
    glu = 2 * merged * (h * h + 3 * h * f)
    return patch + v.num_hidden_layers * layer + conv + glu


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
    lm_head_precision: str | None = None  # None = 16-bit (the compute dtype)
    offload: tuple[str, ...] = ()
    stream_slots: int = STREAM_SLOTS
    # Where the weights live: on the GPU (resident + the streaming slots) or in host (pinned) memory.
    resident_weights_bytes: int = 0
    streaming_buffer_bytes: int = 0
    host: dict[str, int] = field(default_factory=dict)  # {"vision": packed units, "embeddings": the input table}
    vision_flops_per_image: int = 0
    inputs: dict = field(default_factory=dict, repr=False, compare=False)  # the arguments of estimate()

    def variant(self, **changes) -> Estimate:
        """The estimate of the same configuration with some of :func:`estimate`'s arguments changed."""
        est = estimate(**{**self.inputs, **changes})
        est.gpu_bytes = self.gpu_bytes if "gpu_gb" not in changes else est.gpu_bytes
        return est

    @property
    def weights_bytes(self) -> int:
        """Every weight, wherever it lives."""
        return self.weights["total"]

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())

    @property
    def gpu_weights_bytes(self) -> int:
        """What the weights take on the GPU: the resident ones and the streaming slots."""
        return self.resident_weights_bytes + self.streaming_buffer_bytes

    @property
    def activation_peak_bytes(self) -> int:
        return max(self.activation.values())

    @property
    def total_bytes(self) -> int:
        """What the GPU must hold: resident weights, streaming slots, KV cache, activation peak, CUDA context."""
        return self.gpu_weights_bytes + self.kv_cache_bytes + self.activation_peak_bytes + self.cuda_context_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_bytes is None else self.total_bytes <= self.gpu_bytes

    @property
    def pcie_bytes_per_image(self) -> int:
        """Bytes copied host → GPU per image: every streamed vision unit once (0 when the tower is resident)."""
        return self.host.get("vision", 0)

    @property
    def transfer_s_per_image(self) -> dict[str, float]:
        """Seconds of host → GPU copying per image at the assumed effective bandwidths (PCIE_BYTES_PER_S)."""
        return {k: self.pcie_bytes_per_image / bw for k, bw in PCIE_BYTES_PER_S.items()}

    @property
    def vision_compute_s_per_image(self) -> float:
        """Rough vision compute time per image at ASSUMED_VISION_FLOPS_PER_S (an estimate, not a measurement)."""
        return self.vision_flops_per_image / ASSUMED_VISION_FLOPS_PER_S

    def placement(self) -> dict[str, int]:
        """The split :func:`quant.offload.placement_bytes` reports for the loaded model."""
        return {
            "resident": self.resident_weights_bytes,
            "host": self.host_bytes,
            "streaming_buffer": self.streaming_buffer_bytes,
        }

    def flags(self) -> str:
        """The command-line flags that load this configuration."""
        return config_flags(self.precision, self.vision_precision, self.offload, self.lm_head_precision)

    def label(self) -> str:
        return config_label(self.precision, self.vision_precision, self.offload, self.lm_head_precision)

    def to_dict(self) -> dict:
        d = {
            "precision": self.precision,
            "vision_precision": self.vision_precision,
            "lm_head_precision": self.lm_head_precision,
            "offload": list(self.offload),
            "flags": self.flags(),
            "dtype": self.dtype,
            "vision_size": self.vision_size,
            "image_tokens": self.image_tokens,
            "context": self.context,
            "batch": self.batch,
            "device": self.device,
            "weights_bytes": self.weights_bytes,
            "resident_weights_bytes": self.resident_weights_bytes,
            "streaming_buffer_bytes": self.streaming_buffer_bytes,
            "stream_slots": self.stream_slots if "vision" in self.offload else 0,
            "host_bytes": self.host_bytes,
            "kv_cache_bytes_per_token": self.kv_cache_bytes_per_token,
            "kv_cache_bytes": self.kv_cache_bytes,
            "activation_peak_bytes": self.activation_peak_bytes,
            "cuda_context_bytes": self.cuda_context_bytes,
            "total_bytes": self.total_bytes,
            "pcie_bytes_per_image": self.pcie_bytes_per_image,
            "transfer_s_per_image": self.transfer_s_per_image,
            "assumed_pcie_bytes_per_s": dict(PCIE_BYTES_PER_S),
            "vision_flops_per_image": self.vision_flops_per_image,
            "vision_compute_s_per_image": self.vision_compute_s_per_image,
            "assumed_vision_flops_per_s": ASSUMED_VISION_FLOPS_PER_S,
            "breakdown": {"weights": dict(self.weights), "activation": dict(self.activation), "host": dict(self.host)},
            "notes": list(self.notes),
        }
        if self.gpu_bytes is not None:
            d["gpu_bytes"] = self.gpu_bytes
            d["fits"] = self.fits
        return d


def config_flags(
    precision: str, vision_precision: str | None = None, offload=(), lm_head_precision: str | None = None
) -> str:
    """``--precision … [--vision-precision …] [--offload …] [--lm-head-precision …]`` for one configuration."""
    out = [f"--precision {precision}"]
    if vision_precision is not None and vision_precision != precision:
        out.append(f"--vision-precision {vision_precision}")
    if offload:
        out.append(f"--offload {','.join(offload)}")
    if lm_head_precision is not None:
        out.append(f"--lm-head-precision {lm_head_precision}")
    return " ".join(out)


def config_label(
    precision: str, vision_precision: str | None = None, offload=(), lm_head_precision: str | None = None
) -> str:
    """A short name: ``nf4+vision-bf16+head-nf4+offload:vision,embeddings``."""
    label = precision
    if vision_precision is not None and vision_precision != precision:
        label += f"+vision-{vision_precision}"
    if lm_head_precision is not None:
        label += f"+head-{lm_head_precision}"
    return label + (f"+offload:{','.join(offload)}" if offload else "")


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
    lm_head_precision: str | None = None,
    offload: tuple[str, ...] | str | None = (),
    stream_slots: int = STREAM_SLOTS,
) -> Estimate:
    """Predict memory for one configuration. ``config`` defaults to the released GLM-4V-9B.

    ``context`` is the KV-cache length per sequence (prompt, image embeddings included, plus output), ``batch``
    the number of sequences sharing the GPU (their KV caches); the activation peaks are for one image and one
    prompt of ``prompt_tokens`` (default: one image + 512 text tokens, capped at ``context``), since the engine
    prefills one request at a time. ``lm_head_precision`` (None = 16-bit; ``quantize_lm_head`` = the LM's precision,
    the older spelling) is the LM head's; ``offload`` (``vision``, ``embeddings``) keeps those parts in host memory,
    the vision tower streamed through ``stream_slots`` device buffers (:mod:`quant.offload`).
    """
    inputs = dict(locals())  # for Estimate.variant
    from .offload import parse_offload

    c = config or ChatGLMConfig()
    vision_precision = vision_precision or precision
    if lm_head_precision is None and quantize_lm_head:
        lm_head_precision = precision
    for p in (precision, vision_precision, lm_head_precision):
        if p is not None and p not in PRECISIONS:
            raise ValueError(f"unknown precision {p!r}; choose one of {', '.join(PRECISIONS)}")
    offload = parse_offload(offload)
    if "vision" in offload and vision_precision == "int8":
        raise ValueError(
            "--offload vision streams 16-bit and 4-bit vision towers; int8 keeps its statistics in per-layer state "
            "that cannot be streamed — use --vision-precision bf16 or nf4"
        )
    if stream_slots < 1:
        raise ValueError("vision streaming needs at least one slot")
    dtype = _dtype_name(precision, vision_precision, compute_dtype)
    act_bytes = DTYPE_BYTES[dtype]
    lm_float = FLOAT_BYTES.get(precision, act_bytes)
    vision_float = FLOAT_BYTES.get(vision_precision, act_bytes)
    head_float = FLOAT_BYTES.get(lm_head_precision, act_bytes)  # None: the compute dtype (PrecisionSpec.head_dtype)
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
            p, fb = lm_head_precision, head_float
        else:
            p, fb = vision_precision, vision_float
        params, state = linear_tensor_bytes(p, lin, fb, act_bytes, double_quant)
        weights[lin.part] += sum(params)
        weights["quant_state"] += sum(state)
    for part, numel, side in other_tensors(c):
        weights[part] += numel * (lm_float if side == "lm" else vision_float)
    weights["total"] = sum(weights.values())

    # Placement: what leaves the GPU (unpadded, as weight_bytes counts it) and what the host holds (packed).
    host, offloaded, buffer = {}, 0, 0
    if "vision" in offload:
        units = vision_units(c, vision_precision, vision_float, act_bytes, double_quant)
        packed = {name: sum(_align(n) for n in tensors) for name, tensors in units.items()}
        host["vision"] = sum(packed.values())
        offloaded += sum(sum(tensors) for tensors in units.values())
        buffer = stream_slots * max(packed.values())
    if "embeddings" in offload:
        host["embeddings"] = c.padded_vocab_size * c.hidden_size * lm_float
        offloaded += host["embeddings"]

    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * act_bytes
    img_tokens = v.image_tokens(vision_size)
    prompt = min(prompt_tokens or (img_tokens + 512), context)

    # One image and one prompt at a time: the engine prefills requests one by one, so only the KV cache (and the
    # decode step's logits) scale with ``batch``, not these peaks.
    # Vision encoder: residual stream, fused QKV, attention output, MLP hidden before and after GELU, over the patches;
    # then the GLU projector over the 2×2-merged tokens (input, projection, normed, gate, up, product, output). A 4-bit
    # vision tower dequantizes one of its weights at a time (the largest: fc1/fc2 in the ViT, h→4h in the GLU).
    g = vision_size // v.patch_size
    patches, merged = g * g + 1, (g // 2) ** 2
    vision_deq = vision_precision in ("nf4", "fp4")
    vit = patches * (v.hidden_size * 5 + 2 * v.intermediate_size) * vision_float
    vit += v.hidden_size * v.intermediate_size * act_bytes if vision_deq else 0
    glu = merged * (3 * c.hidden_size + 3 * c.ffn_hidden_size) * act_bytes
    glu += c.hidden_size * c.ffn_hidden_size * act_bytes if vision_deq else 0
    # Prefill: residual, QKV, attention output, fused gate/up, SwiGLU product, MLP output (one layer at a time), and
    # a 4-bit LM's dequantized weight (the largest, the fused gate/up); only the last position reaches the LM head.
    qkv = c.num_attention_heads * c.head_dim + 2 * c.num_kv_heads * c.head_dim
    lm_deq = c.hidden_size * 2 * c.ffn_hidden_size * act_bytes if precision in ("nf4", "fp4") else 0
    pre = prompt * (3 * c.hidden_size + qkv + 3 * c.ffn_hidden_size) * act_bytes + lm_deq
    pre += c.padded_vocab_size * 4  # the last position's logits, fp32 for sampling
    # Decode: ``batch`` rows per step: the logits, and past BNB_4BIT_FUSED_MAX_ROWS rows a 4-bit layer's weight
    # dequantized (the LM head's, 151552×4096, when the head is 4-bit).
    dec = batch * c.padded_vocab_size * 4
    if batch > BNB_4BIT_FUSED_MAX_ROWS:
        head_deq = c.padded_vocab_size * c.hidden_size * act_bytes if lm_head_precision in ("nf4", "fp4") else 0
        dec += max(lm_deq, head_deq)
    activation = {"vision_encoder": max(vit, glu), "prefill": pre, "decode": dec}

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
        lm_head_precision=lm_head_precision,
        offload=offload,
        stream_slots=stream_slots,
        resident_weights_bytes=weights["total"] - offloaded,
        streaming_buffer_bytes=buffer,
        host=host,
        vision_flops_per_image=vision_flops(c, vision_size),
        inputs=inputs,
    )
    return est
