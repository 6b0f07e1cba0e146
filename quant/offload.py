"""Low-VRAM placement, as a transformation of a loaded model: the vision tower streamed from host memory, the input
embedding table kept on the host. The network in :mod:`glm4v` is unchanged; only where tensors live changes.

**Vision streaming** (``--offload vision``). The vision tower (4.4 B of GLM-4V-9B's 13.9 B parameters) runs once per
image, never during decode. Its weights are split into *units* — the patch embedding, each of the 63 ViT layers, the
2×2 conv and each Linear of the GLU projector (each at most one ViT layer's size) — and each unit's tensors
(parameters and bitsandbytes statistics) are packed into one flat buffer in host memory (pinned on a CUDA machine).
On the compute device there are only ``slots`` buffers of the largest unit's size (2 by default: a double buffer).
When a unit's module starts its forward, its weights are already being copied into a slot on a side CUDA stream
(prefetched when the previous unit started), the compute stream waits for that copy only, the unit's tensors are
pointed at the slot, and the copy of the *next* unit starts into the other slot as soon as the unit that used it has
finished computing — so the transfer of layer i+1 hides behind the compute of layer i. After its forward the unit's
tensors point back at host memory: nothing of the vision tower stays on the device between images but the slots.
Hooks on the units' modules drive it, so every caller — the engine's staged prefill (``--vision-layers-per-step``),
the plain decode loop, the reference ``forward`` — streams the same way.

**Host embeddings** (``--offload embeddings``). The 151,552 × 4096 input table is a lookup: it stays on the host, and
each step copies only the rows it needs (B × 4096 values per decode step) to the device.

On a CPU both are the same memory; the transformation still runs (that is how the tests check it), at no benefit.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .memory import module_quant_state

log = logging.getLogger(__name__)

OFFLOAD_PARTS = ("vision", "embeddings")
OFFLOADED_PREFIXES = {"vision": "transformer.vision", "embeddings": "transformer.embedding"}
ALIGN = 256  # bytes: every tensor in a packed buffer starts on such a boundary (any dtype's alignment)


def parse_offload(value) -> tuple[str, ...]:
    """``"vision,embeddings"`` / ``"none"`` / an iterable → a sorted tuple of parts (ValueError names a bad one)."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    parts = {x.strip().lower() for x in items if x and x.strip()}
    parts.discard("none")
    bad = sorted(parts - set(OFFLOAD_PARTS))
    if bad:
        raise ValueError(f"--offload takes {', '.join(OFFLOAD_PARTS)} (comma-separated) or none, not {bad[0]!r}")
    return tuple(p for p in OFFLOAD_PARTS if p in parts)


def check_offload(spec, offload: tuple[str, ...]) -> None:
    """Refuse what cannot be streamed, before anything is loaded."""
    if "vision" in offload and spec.vision_precision == "int8":
        raise ValueError(
            "--offload vision streams 16-bit and 4-bit vision towers; int8 keeps its statistics in "
            "per-layer state that cannot be streamed — use --vision-precision bf16 or nf4"
        )


def host_device_map(device: torch.device, on_host: list[str]) -> dict[str, str | torch.device]:
    """``device_map`` for ``from_pretrained``: the offloaded parts straight into host memory, the rest on ``device``
    (the vision tower never passes through the GPU, which could not hold it in bf16 on an 8 GB card)."""
    if not on_host or torch.device(device).type == "cpu":
        return {"": device}
    return {**{OFFLOADED_PREFIXES[p]: "cpu" for p in on_host}, "": device}


def restore_host_modules(model: nn.Module, model_dir, prefixes: list[str]) -> None:
    """Make the host-placed modules plain CPU modules: drop accelerate's offload hooks (which would stream every
    weight at every call, without prefetch) and give any tensor they left on the meta device its value from the
    checkpoint."""
    try:
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(model, recurse=True)
    except ImportError:  # pragma: no cover - accelerate is a dependency
        pass
    missing = {
        n: t
        for n, t in list(model.named_parameters()) + list(model.named_buffers())
        if t.device.type == "meta" and n.startswith(tuple(prefixes))
    }
    if not missing:
        return
    from pathlib import Path

    from safetensors import safe_open

    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in set(sf.keys()) & set(missing):
                mname, _, tname = key.rpartition(".")
                module = model.get_submodule(mname)
                value = sf.get_tensor(key).to(missing.pop(key).dtype)
                if tname in module._parameters:
                    module._parameters[tname] = nn.Parameter(value, requires_grad=False)
                else:
                    module._buffers[tname] = value
    if missing:
        raise RuntimeError(f"host-placed tensors missing from the checkpoint: {', '.join(sorted(missing)[:5])}")


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class _Ref:
    """One tensor a unit owns: where it hangs (a parameter's ``.data`` or an attribute of a quant state)."""

    def __init__(self, owner, attr: str, is_param: bool, tensor: torch.Tensor, offset: int):
        self.owner, self.attr, self.is_param = owner, attr, is_param
        self.dtype, self.shape, self.nbytes = tensor.dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size()
        self.offset = offset

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)

    def point_at(self, t: torch.Tensor) -> None:
        if self.is_param:
            self.owner.data = t
        else:
            setattr(self.owner, self.attr, t)


def _unit_tensors(module: nn.Module) -> list[tuple[object, str, bool, torch.Tensor]]:
    """(owner, attribute, is_parameter, tensor) for every parameter and bitsandbytes statistic under ``module``."""
    out, seen = [], set()
    for m in module.modules():
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out.append((p, "data", True, p.data))
        weight = getattr(m, "weight", None)
        state = getattr(weight, "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                t = getattr(state, name, None)
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    out.append((state, name, False, t))
            state = getattr(state, "state2", None)
        if any(True for _ in module_quant_state(m)) and getattr(weight, "quant_state", None) is None:
            raise ValueError(f"{type(m).__name__}: only 16-bit and 4-bit layers can be streamed (int8 cannot)")
    return out


class _Unit:
    def __init__(self, name: str, module: nn.Module, pin: bool):
        self.name, self.module = name, module
        tensors = _unit_tensors(module)
        if any(t.device.type == "meta" for *_, t in tensors):
            raise RuntimeError(f"vision unit {name} has no weights (meta tensors)")
        refs, offset = [], 0
        for owner, attr, is_param, t in tensors:
            refs.append(_Ref(owner, attr, is_param, t, offset))
            offset += _align(refs[-1].nbytes)
        self.refs, self.nbytes = refs, offset
        host = torch.empty(offset, dtype=torch.uint8, pin_memory=pin)
        for ref, (_, _, _, t) in zip(refs, tensors, strict=True):
            ref.view(host).copy_(t.detach())
            ref.point_at(ref.view(host))  # the device copy is dropped here: one unit at a time
        del tensors
        self.host = host
        self.slot: int | None = None  # the slot holding (or receiving) this unit's weights
        self.ready: torch.cuda.Event | None = None


class VisionStreamer:
    """Streams the vision tower's units through ``slots`` device buffers (see the module docstring)."""

    def __init__(self, vision: nn.Module, device: torch.device, slots: int = 2, prepare=None):
        """``prepare(vision, unit_name)`` runs on each unit just before it is packed (the loader quantizes it there,
        on the compute device, so at most one unit's weights are ever there at load time)."""
        if slots < 1:
            raise ValueError("vision streaming needs at least one slot")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        pin = self.cuda
        modules = [("patch_embedding", vision.patch_embedding)]
        modules += [(f"transformer.layers.{i}", layer) for i, layer in enumerate(vision.transformer.layers)]
        modules += [("conv", vision.conv)]
        # The GLU's Linears in the order its forward calls them (silu(gate_proj(x)) * dense_h_to_4h(x)): the unit
        # prefetched while unit i runs must be the one that runs next, or it would evict one still to run.
        glu = vision.linear_proj
        modules += [
            (f"linear_proj.{n}", getattr(glu, n))
            for n in ("linear_proj", "gate_proj", "dense_h_to_4h", "dense_4h_to_h")
        ]
        self.units = []
        for name, module in modules:
            if prepare is not None:
                prepare(vision, name)
                module = vision.get_submodule(name)  # prepare may have swapped it (a Linear for a bnb layer)
            _no_cpu_repacking(module)
            self.units.append(_Unit(name, module, pin))
        slot_bytes = max(u.nbytes for u in self.units)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(slots)]
        self.slot_owner: list[_Unit | None] = [None] * slots
        self.slot_free: list[torch.cuda.Event | None] = [None] * slots  # compute done with the slot's last unit
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._next_slot = 0
        self.bytes_copied = 0  # instrumentation: what crossed to the device, and how many units were there at once
        self.max_resident_units = 0
        self.copies: list[str] = []
        for i, unit in enumerate(self.units):
            unit.module.register_forward_pre_hook(lambda m, args, i=i: self._acquire(i))
            unit.module.register_forward_hook(lambda m, args, out, i=i: self._release(i))

    # ---- facts --------------------------------------------------------------------------------------------
    @property
    def host_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    @property
    def buffer_bytes(self) -> int:
        return sum(s.numel() for s in self.slots)

    def resident_units(self) -> list[str]:
        """Units whose tensors point at a device slot right now (only while their forward runs)."""
        return [u.name for u in self.units if self._points_at_slot(u)]

    def _points_at_slot(self, unit: _Unit) -> bool:
        if unit.slot is None or not unit.refs:
            return False
        ref = unit.refs[0]
        t = ref.owner.data if ref.is_param else getattr(ref.owner, ref.attr)
        return t.untyped_storage().data_ptr() == self.slots[unit.slot].untyped_storage().data_ptr()

    # ---- the schedule -------------------------------------------------------------------------------------
    def _start_copy(self, i: int) -> None:
        """Begin copying unit ``i`` into the next slot (after the compute that last used that slot)."""
        unit = self.units[i]
        if unit.slot is not None:
            return  # already there, or on its way
        s = self._next_slot
        self._next_slot = (s + 1) % len(self.slots)
        old = self.slot_owner[s]
        if old is not None:
            old.slot = None
        self.slot_owner[s] = unit
        unit.slot = s
        dst = self.slots[s][: unit.nbytes]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                if self.slot_free[s] is not None:
                    self.copy_stream.wait_event(self.slot_free[s])
                dst.copy_(unit.host, non_blocking=True)
                unit.ready = torch.cuda.Event()
                unit.ready.record(self.copy_stream)
        else:
            dst.copy_(unit.host)
        self.bytes_copied += unit.nbytes
        self.copies.append(unit.name)

    def _acquire(self, i: int) -> None:
        unit = self.units[i]
        self._start_copy(i)
        if self.cuda and unit.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(unit.ready)
        flat = self.slots[unit.slot]
        for ref in unit.refs:
            ref.point_at(ref.view(flat))
        self.max_resident_units = max(self.max_resident_units, len(self.resident_units()))
        if i + 1 < len(self.units) and len(self.slots) > 1:
            self._start_copy(i + 1)  # the next unit's transfer overlaps this one's compute

    def _release(self, i: int) -> None:
        unit = self.units[i]
        if self.cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self.slot_free[unit.slot] = done
            # The host buffer must outlive the copy reading it; it does (it lives as long as the unit).
        for ref in unit.refs:
            ref.point_at(ref.view(unit.host))
        if i + 1 >= len(self.units):
            # The image is done: forget slot assignments so nothing is kept "resident" between images.
            for s, owner in enumerate(self.slot_owner):
                if owner is not None:
                    owner.slot = None
                self.slot_owner[s] = None


def _no_cpu_repacking(vision: nn.Module) -> None:
    """bitsandbytes repacks a 4-bit weight in place on its first CPU forward (docs/MODEL.md §8.5); a streamed weight
    is re-pointed every image, so streamed 4-bit layers keep the plain layout (CPU only; GPUs never repack)."""
    for m in vision.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


class HostEmbedding(nn.Module):
    """The input embedding table in host memory: a lookup copies just the rows it needs to the compute device."""

    def __init__(self, embedding: nn.Embedding, device: torch.device):
        super().__init__()
        self.device = torch.device(device)
        weight = embedding.weight.detach()
        host = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=self.device.type == "cuda")
        host.copy_(weight)
        self.weight = nn.Parameter(host, requires_grad=False)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.rows_copied = 0  # instrumentation

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to("cpu")
        rows = F.embedding(ids, self.weight)  # (…, H) on the host
        self.rows_copied += ids.numel()
        return rows.to(self.device, non_blocking=True)


def offload_embeddings(model: nn.Module, device: torch.device) -> HostEmbedding:
    emb = model.transformer.embedding
    host = HostEmbedding(emb.word_embeddings, device)
    emb.word_embeddings = host
    return host


def offload_vision(model: nn.Module, device: torch.device, slots: int = 2, prepare=None) -> VisionStreamer:
    streamer = VisionStreamer(model.transformer.vision, device, slots, prepare)
    model.transformer.vision.streamer = streamer  # kept alive with the model; never saved (not a module)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    log.info(
        "vision tower streamed from host memory: %.2f GiB on the host, %d × %.0f MiB slots on %s",
        streamer.host_bytes / 2**30,
        len(streamer.slots),
        streamer.slots[0].numel() / 2**20,
        device,
    )
    return streamer


def placement_bytes(model: nn.Module) -> dict[str, int]:
    """Where a loaded model's weights live: ``host`` (packed vision units, the host embedding table),
    ``streaming_buffer`` (the device slots) and ``resident`` (every other weight and statistic, on the device)."""
    from .memory import weight_bytes

    total = weight_bytes(model)["total"]
    host = offloaded = buffer = 0
    streamer = getattr(model.transformer.vision, "streamer", None)
    if streamer is not None:
        host += streamer.host_bytes
        offloaded += sum(ref.nbytes for u in streamer.units for ref in u.refs)
        buffer += streamer.buffer_bytes
    emb = model.transformer.embedding.word_embeddings
    if isinstance(emb, HostEmbedding):
        n = emb.weight.numel() * emb.weight.element_size()
        host += n
        offloaded += n
    return {"resident": total - offloaded, "host": host, "streaming_buffer": buffer}
