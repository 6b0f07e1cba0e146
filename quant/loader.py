"""Load GLM-4V-9B from the official folder at a chosen precision.

The language model is quantized *while* loading by ``from_pretrained(quantization_config=...)``: each tensor is
read from the safetensors mmap, quantized on the target device and the float copy dropped, so peak memory stays near
the quantized size plus one tensor. A vision tower at its own precision is handled after that:

* float vision (e.g. nf4 LM + bf16 vision, the recommended arm): it is simply left out of the quantization pass;
* a different bitsandbytes method (e.g. nf4 LM + int8 vision): it loads in 16-bit and is then quantized in place,
  one Linear at a time, so peak memory is the quantized LM plus the 16-bit vision tower (~9 GB for the real model).

A quantized model is never moved with ``.to()`` (bitsandbytes forbids it; GLM-4 #168).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from glm4v import ChatGLMForConditionalGeneration, GLM4Tokenizer, ImageProcessor
from glm4v.checkpoint import CheckpointInfo, inspect_checkpoint

from .bnb import fix_cpu_4bit_layers, layer_types, quantize_linears, quantized_linear
from .memory import weight_bytes
from .offload import (
    OFFLOADED_PREFIXES,
    check_offload,
    host_device_map,
    offload_embeddings,
    offload_vision,
    parse_offload,
    restore_host_modules,
)
from .precision import FLOAT_PRECISIONS, LM_HEAD, VISION, PrecisionSpec, parse_dtype, precision_name
from .prequantized import check_keys, check_request, held_quantization

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _return_freed_host_memory():
    """While loading, let glibc hand large freed blocks straight back to the OS.

    Quantizing on the CPU allocates and frees one float weight per layer. With glibc's default dynamic mmap
    threshold those blocks end up in the heap, which fragments and never shrinks: an nf4 load then holds ~3× its
    quantized size. Serving each block >1 MiB from mmap keeps the peak near the quantized size plus one shard. The
    threshold is raised back afterwards (to glibc's own ceiling, 32 MiB) so inference allocations stay cheap.
    """
    libc = None
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_mmap_threshold = -3
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    libc.mallopt(m_mmap_threshold, 1 << 20)
    try:
        yield
    finally:
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
        libc.mallopt(m_mmap_threshold, 32 << 20)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to load on: the default when None, and "cuda" pinned to the current index."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class LoadedModel:
    """Everything a caller needs to run the model, and the facts to report about it."""

    model: ChatGLMForConditionalGeneration
    tokenizer: GLM4Tokenizer
    image_processor: ImageProcessor
    spec: PrecisionSpec
    device: torch.device
    model_dir: Path
    vision_size: int
    load_s: float
    checkpoint: CheckpointInfo
    weight_bytes: dict[str, int] = field(default_factory=dict)
    offload: tuple[str, ...] = ()  # parts kept in host memory (quant.offload)
    demo: bool = False  # not GLM-4V-9B: the shipped demo model, or --synthetic random weights
    prequantized: bool = False  # read from a `glm4v-edge quantize` folder, not quantized while loading

    @property
    def config(self):
        return self.model.config

    def image_tokens(self, vision_size: int | None = None) -> int:
        return self.config.vision.image_tokens(vision_size or self.vision_size)

    def placement(self) -> dict:
        """Where each part lives and at what precision, and the bytes on the device vs in host memory."""
        from .offload import placement_bytes

        spec, where = self.spec, {True: "host", False: self.device.type}
        streamer = getattr(self.model.transformer.vision, "streamer", None)
        parts = {
            "language_model": {"device": self.device.type, "precision": spec.precision},
            "embeddings": {"device": where["embeddings" in self.offload], "precision": precision_name(spec.dtype)},
            "lm_head": {
                "device": self.device.type,
                "precision": spec.lm_head_precision or precision_name(spec.head_dtype()),
            },
            "vision": {"device": where["vision" in self.offload], "precision": spec.vision_precision},
        }
        if streamer is not None:
            parts["vision"]["streamed"] = {
                "units": len(streamer.units),
                "slots": len(streamer.slots),
                "slot_bytes": streamer.slots[0].numel(),
            }
        b = placement_bytes(self.model)
        return {
            "parts": list(self.offload),
            "placement": parts,
            "resident_bytes": b["resident"],
            "host_bytes": b["host"],
            "streaming_buffer_bytes": b["streaming_buffer"],
        }

    def describe(self) -> dict:
        """What was loaded, as plain JSON: precision spec, the layer classes actually present, sizes."""
        d = self.spec.describe()
        d["layers"] = {
            "language_model": layer_types(self.model, "transformer.encoder"),
            "lm_head": layer_types(self.model, "transformer.output_layer"),
            "vision": layer_types(self.model, VISION),
        }
        d["vision_size"] = self.vision_size
        d["image_tokens"] = self.image_tokens()
        d["offload"] = self.placement()
        d["weight_bytes"] = self.weight_bytes.get("total")
        d["num_parameters"] = self.checkpoint.num_parameters
        if d.get("quantization") is not None:
            d["quantization"]["prequantized"] = self.prequantized
        if self.prequantized:
            d["notes"] = [*d.get("notes", []), "pre-quantized checkpoint: loaded as it is, not quantized at start"]
        return d


def resolve_request(
    config, device, vision_size, offload=(), **spec_args
) -> tuple[torch.device, PrecisionSpec, int, tuple[str, ...]]:
    """What :func:`load` and :func:`quant.synthetic.build` both settle first: the device, the precision spec for it,
    a valid vision size (default: the checkpoint's own) and the parts to keep in host memory (refused here, before
    anything is read, when they cannot be)."""
    device = resolve_device(device)
    spec = PrecisionSpec(**spec_args).resolve(device)
    vision_size = vision_size or config.vision.image_size
    check_vision_size(vision_size, config.vision.image_size)
    offload = parse_offload(offload)
    check_offload(spec, offload)
    return device, spec, vision_size, offload


def place_in_host_memory(model, spec: PrecisionSpec, device: torch.device, offload: tuple[str, ...]) -> None:
    """The offloaded parts, once loaded (or built) in host memory: the vision tower packed for streaming — a
    quantized one quantized on ``device`` one unit at a time as it is packed — and the input table on the host."""
    if "vision" in offload:
        prepare = partial(quantize_unit, precision=spec.vision_precision, spec=spec, device=device)
        offload_vision(model, device, prepare=prepare if spec.vision_quantized else None)
    if "embeddings" in offload:
        offload_embeddings(model, device)


def load(
    model_dir: str | Path,
    precision: str = "bf16",
    vision_precision: str | None = None,
    device: str | torch.device | None = None,
    vision_size: int | None = None,
    compute_dtype: str | torch.dtype | None = None,
    double_quant: bool = True,
    quantize_lm_head: bool = False,
    lm_head_precision: str | None = None,
    offload: tuple[str, ...] = (),
) -> LoadedModel:
    """Load the checkpoint in ``model_dir``; returns model, tokenizer, image processor and precision spec together.

    ``vision_size`` (a multiple of 28, up to the trained 1120) runs the vision tower at a smaller resolution with
    its position table resampled; by default the checkpoint's own ``image_size``. ``offload`` (``vision``,
    ``embeddings``) keeps those parts in host memory (:mod:`quant.offload`); they are loaded there directly, never
    onto the GPU first.
    """
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    held = held_quantization(model_dir)  # a pre-quantized folder (glm4v-edge quantize) loads as it is
    info = inspect_checkpoint(model_dir, check_keys=held is None)  # fails fast, before reading any weight
    if held is not None:
        asked_dtype = None if compute_dtype is None else precision_name(parse_dtype(compute_dtype))
        check_request(held, model_dir, precision, vision_precision, lm_head_precision, offload, asked_dtype)
        info = check_keys(info)
        double_quant = held.double_quant
        compute_dtype = held.float_dtype  # what its unquantized tensors were written in
    device, spec, vision_size, offload = resolve_request(
        info.config,
        device,
        vision_size,
        precision=precision,
        vision_precision=vision_precision,
        compute_dtype=compute_dtype,
        double_quant=double_quant,
        quantize_lm_head=quantize_lm_head,
        lm_head_precision=lm_head_precision,
        offload=offload,
    )

    load_dtype = FLOAT_PRECISIONS.get(spec.precision, spec.dtype)
    quantizing_on_host = device.type == "cpu" and (spec.lm_quantized or spec.vision_quantized)
    with _return_freed_host_memory() if quantizing_on_host else contextlib.nullcontext():
        on_host = [part for part, prefix in OFFLOADED_PREFIXES.items() if part in offload]
        skip = spec.skipped_modules() + (
            [VISION] if "vision" in offload and VISION not in spec.skipped_modules() else []
        )
        quantization = spec.bnb_config(skip=skip, cpu_offload=bool(on_host) and device.type != "cpu")
        model = ChatGLMForConditionalGeneration.from_pretrained(
            str(model_dir),
            dtype=load_dtype,
            quantization_config=None if held else quantization,  # a pre-quantized folder's own config.json says it
            device_map=host_device_map(device, on_host),
        )
        if on_host and device.type != "cpu":
            restore_host_modules(model, model_dir, [OFFLOADED_PREFIXES[p] for p in on_host])
        vision = model.transformer.vision
        if "vision" in offload:
            if spec.vision_dtype() != load_dtype and not spec.vision_quantized:
                vision.to(spec.vision_dtype())  # quantized ones are quantized as they are packed
        elif spec.vision_precision != spec.precision:
            if spec.vision_quantized:
                quantize_linears(vision, spec.vision_precision, spec, device, prefix=VISION)
            elif spec.vision_dtype() != load_dtype:
                vision.to(spec.vision_dtype())  # float tensors only: the vision tower was left out of quantization
        apply_head_precision(model, spec, device, load_dtype)
        place_in_host_memory(model, spec, device, offload)
    finish_model(model, device, vision_size)
    loaded = LoadedModel(
        model=model,
        tokenizer=GLM4Tokenizer.from_pretrained(model_dir),
        image_processor=ImageProcessor(vision_size),
        spec=spec,
        device=device,
        model_dir=model_dir,
        vision_size=vision_size,
        load_s=time.perf_counter() - t0,
        checkpoint=info,
        offload=offload,
        prequantized=held is not None,
    )
    loaded.weight_bytes = weight_bytes(model)
    log.info(
        "loaded %s at %s on %s in %.1fs (%.2f GiB of weights)",
        model_dir,
        spec.label(),
        device,
        loaded.load_s,
        loaded.weight_bytes["total"] / 2**30,
    )
    return loaded


def quantize_unit(root, name: str, precision: str, spec: PrecisionSpec, device: torch.device) -> None:
    """Quantize the Linear layers of ``root.<name>`` in place (``name`` may itself be a Linear)."""
    module = root.get_submodule(name)
    if type(module) is torch.nn.Linear:
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent), child, quantized_linear(module, precision, spec, device))
    else:
        quantize_linears(module, precision, spec, device, prefix=name)


def apply_head_precision(model, spec: PrecisionSpec, device: torch.device, load_dtype: torch.dtype) -> None:
    """``--lm-head-precision``: a bitsandbytes method other than the LM's is applied after loading (the head was
    loaded in 16-bit); a float one is a cast. Quantized with the LM's own method, it was done while loading."""
    head = model.transformer.output_layer
    if spec.head_quantized and LM_HEAD in spec.skipped_modules():
        model.transformer.output_layer = quantized_linear(head, spec.lm_head_precision, spec, device)
    elif not spec.head_quantized and head.weight.dtype != spec.head_dtype():
        head.to(spec.head_dtype())


def finish_model(model: ChatGLMForConditionalGeneration, device: torch.device, vision_size: int) -> None:
    """The last step of every load and synthetic build: an inference model at its vision size."""
    if device.type == "cpu":
        fix_cpu_4bit_layers(model)
    model.eval()
    # An inference model: no autograd graph (memory), and bitsandbytes' CPU 4-bit matmul adds a bias in place,
    # which autograd refuses when the bias requires grad. Fine-tuners can turn it back on.
    model.requires_grad_(False)
    vc = model.config.vision
    if vision_size != vc.image_size:
        model.transformer.vision.patch_embedding.position_table(vision_size // vc.patch_size)  # resample once
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_vision_size(size: int, trained: int) -> None:
    """A multiple of 28 from 224 (half the trained size for small test checkpoints) up to the trained size."""
    low = min(224, trained // 2)
    if size % 28 or not low <= size <= trained:
        raise ValueError(f"vision size {size} must be a multiple of 28 between {low} and the trained size {trained}")
