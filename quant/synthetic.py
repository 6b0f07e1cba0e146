"""A GLM-4V model with random weights built straight on the target device, quantized layer by layer.

Why: real VRAM and speed of the full 13.9B-parameter architecture can then be measured on any GPU without the
28 GB download (``glm4v-edge profile --synthetic full``). The network is first built on the meta device (shapes
only, no memory); then each module is materialized on the device one at a time with random values, and each
Linear that the precision quantizes is quantized immediately (the same :func:`quant.bnb.quantized_linear` the
loader uses), so the float copy of only one layer exists at any moment. Peak memory is the quantized model plus
the largest float Linear (the 151552×4096 LM head: 1.2 GB in bf16).

The result is a :class:`quant.loader.LoadedModel` like :func:`quant.load` returns, with a tokenizer whose
vocabulary has the config's size (random ids decode to ``<tok123>``), so the profiler treats both alike.
Answers are noise; memory, latency and layer types are real. ``full`` needs a GPU with room for the chosen
precision (``glm4v-edge estimate`` tells: about 10 GB for nf4, 16 GB for int8, 29 GB for bf16).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from glm4v import ChatGLMConfig, ChatGLMForConditionalGeneration, GLM4Tokenizer, ImageProcessor
from glm4v.checkpoint import CheckpointInfo, expected_shapes, load_config
from glm4v.tokenizer import SPECIAL_TOKENS

from .bnb import quantized_linear
from .loader import LoadedModel, finish_model, place_in_host_memory, resolve_request
from .memory import weight_bytes
from .offload import OFFLOADED_PREFIXES
from .precision import FLOAT_PRECISIONS, LM_HEAD, VISION, PrecisionSpec

log = logging.getLogger(__name__)

SYNTHETIC_NAMES = ("full", "tiny", "mid")  # or a path to a config.json / checkpoint folder


def synthetic_config(name: str) -> ChatGLMConfig:
    """``full`` = the released GLM-4V-9B, ``tiny``/``mid`` = the test presets, else a config.json or folder."""
    if name == "full":
        return ChatGLMConfig()
    if name in ("tiny", "mid"):
        from glm4v.tiny import make_config

        raw = make_config(name)
    else:
        path = Path(name)
        if path.is_dir():
            return load_config(path)
        if not path.is_file():
            raise ValueError(
                f"--synthetic {name!r}: not one of {', '.join(SYNTHETIC_NAMES)} and not a config.json file or folder"
            )
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    config = ChatGLMConfig(**{k: v for k, v in raw.items() if k not in ("auto_map", "architectures")})
    config.validate_for_model()
    return config


def synthetic_tokenizer(config: ChatGLMConfig) -> GLM4Tokenizer:
    """A tokenizer covering every id of the config's vocabulary: 256 byte tokens, ``<tokN>`` placeholders up to
    the first special token, then the real special tokens at ``pad_token_id + i`` (as in the released model)."""
    first_special = config.pad_token_id
    ranks = {bytes([b]): i for i, b in enumerate(range(256))}
    for i in range(256, first_special):
        ranks[f"<tok{i}>".encode()] = i
    specials = {t: first_special + i for i, t in enumerate(SPECIAL_TOKENS)}
    return GLM4Tokenizer(ranks, specials, config.vision.image_size)


def _linear_precision(name: str, spec: PrecisionSpec) -> str | None:
    """The bitsandbytes precision a Linear named ``name`` gets, as the loader would decide; None = stays float."""
    if name.startswith(VISION):
        p = spec.vision_precision
    elif name.startswith(LM_HEAD):
        p = spec.lm_head_precision
    else:
        p = spec.precision
    return p if p is not None and PrecisionSpec.is_quantized_name(p) else None


def _materialize(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give ``module``'s own (non-recursive) parameters and buffers real storage on ``device``."""
    for pname, p in list(module.named_parameters(recurse=False)):
        module._parameters[pname] = nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype), requires_grad=False)
    for bname, b in list(module.named_buffers(recurse=False)):
        module._buffers[bname] = torch.empty(b.shape, device=device, dtype=b.dtype)


def _fill_random(model: ChatGLMForConditionalGeneration, module: nn.Module) -> None:
    # The model's own init covers every parameter kind (Linear, Conv2d, Embedding, norms, boi/eoi, CLS).
    model._init_weights(module)


@torch.no_grad()
def build(
    config: ChatGLMConfig | str = "full",
    precision: str = "bf16",
    vision_precision: str | None = None,
    device: str | torch.device | None = None,
    vision_size: int | None = None,
    compute_dtype: str | torch.dtype | None = None,
    double_quant: bool = True,
    quantize_lm_head: bool = False,
    seed: int = 0,
    name: str | None = None,
    lm_head_precision: str | None = None,
    offload: tuple[str, ...] = (),
) -> LoadedModel:
    """Random-weight GLM-4V at ``precision`` on ``device``; same arguments and result type as :func:`quant.load`.
    Offloaded parts are built in host memory directly (the vision tower's units quantized on the device one at a
    time, as the loader does)."""
    t0 = time.perf_counter()
    name = name or (config if isinstance(config, str) else "config")
    if isinstance(config, str):
        config = synthetic_config(config)
    device, spec, vision_size, offload = resolve_request(
        config,
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
    host_prefixes = tuple(OFFLOADED_PREFIXES[p] for p in offload)

    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)  # shapes only: no memory, no init cost
    torch.manual_seed(seed)
    lm_dtype = FLOAT_PRECISIONS.get(spec.precision, spec.dtype)
    vision_dtype = spec.vision_dtype()
    n_quantized = 0
    # Names only: a list of the modules themselves would keep every replaced float Linear (and its weight) alive
    # until the end, and the peak would be the whole float model instead of one layer.
    names = [
        n
        for n, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))
    ]
    for mname in names:
        module = model.get_submodule(mname)
        dtype = vision_dtype if mname.startswith(VISION) else lm_dtype
        on_host = mname.startswith(host_prefixes) if host_prefixes else False
        qprec = _linear_precision(mname, spec) if type(module) is nn.Linear else None
        if on_host and mname.startswith(VISION):
            qprec = None  # quantized unit by unit when it is packed for streaming
            if spec.vision_quantized and type(module) is nn.Linear:
                dtype = spec.dtype
        if mname.startswith(LM_HEAD) and qprec is None:
            dtype = spec.head_dtype()
        if qprec is None:
            _materialize(module, torch.device("cpu") if on_host else device, dtype)
            _fill_random(model, module)
            continue
        # Float weights in the compute dtype, quantized at once; only this one layer exists in float.
        _materialize(module, device, spec.dtype)
        _fill_random(model, module)
        if qprec == "int8" and device.type != "cpu":
            # bitsandbytes' Int8Params quantizes only when moved *from the CPU*; a weight already on the GPU
            # would stay float. Stage this one layer on the host.
            module.weight.data = module.weight.data.cpu()
        parent_name, _, child = mname.rpartition(".")
        setattr(model.get_submodule(parent_name), child, quantized_linear(module, qprec, spec, device))
        del module  # the float layer goes now, not at the next iteration
        n_quantized += 1
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"synthetic build left tensors unmaterialized: {', '.join(left[:5])}")
    place_in_host_memory(model, spec, device, offload)
    finish_model(model, device, vision_size)

    path = Path(f"synthetic/{name}")
    loaded = LoadedModel(
        model=model,
        tokenizer=synthetic_tokenizer(config),
        image_processor=ImageProcessor(vision_size),
        spec=spec,
        device=device,
        model_dir=path,
        vision_size=vision_size,
        load_s=time.perf_counter() - t0,
        checkpoint=CheckpointInfo(path, config, [], expected_shapes(config), {}),
        demo=True,
        offload=offload,
    )
    loaded.weight_bytes = weight_bytes(model)
    log.info(
        "built synthetic %s at %s on %s in %.1fs (%d Linear layers quantized, %.2f GiB of weights)",
        name,
        spec.label(),
        device,
        loaded.load_s,
        n_quantized,
        loaded.weight_bytes["total"] / 2**30,
    )
    return loaded
