"""One step of ``glm4v-edge gpu-check``, run in a fresh process: ``env``, ``config`` or ``compile``.

``gpu-check`` starts ``python -m profiling.gpu_check_worker '<StepSpec JSON>'`` once per step, so no configuration
inherits another's CUDA context, allocator cache or per-process memory cap. It speaks the line protocol of
:mod:`profiling.profile_worker` on stdout: ``@@profile {"event": "partial", "fields": {...}}`` after each phase (so
a step killed at the time limit still leaves what it measured), then one ``{"event": "result", "fields": {...}}``
or ``{"event": "error", ...}``. Everything else goes to stderr (the step's log).

* ``env``: versions, the GPU, the CUDA context's size, whether bitsandbytes' kernels run on the device, and the
  memory bandwidth by a large device-to-device copy (on a CPU: a host memcpy) — the ceiling for decode.
* ``config``: one configuration from random full-size weights. With ``card_gib`` (CUDA only) the process first caps
  torch's allocator at that card's size minus the CUDA context (``torch.cuda.set_per_process_memory_fraction``) and
  loads and answers one image + prompt under the cap (pass, or fail with where it ran out); the cap is then lifted
  for the decode timings. Load, memory after load, one image + prompt (vision encode, TTFT, peaks), then the decode
  step timed at each batch size, with the bytes it reads per second.
* ``compile``: load again and time the decode step compiled (``serve --compile``'s fixed-shape step).
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .profile_worker import emit, is_oom, worker_main

log = logging.getLogger("profiling.gpu_check")

GIB = 2**30


@dataclass
class StepSpec:
    """Everything one step needs; JSON-serialisable so it travels on the command line."""

    kind: str  # "env" | "config" | "compile"
    device: str = "cuda"
    synthetic: str = "full"
    name: str = ""
    precision: str = "nf4"
    vision_precision: str | None = None
    offload: list[str] = field(default_factory=list)
    lm_head_precision: str | None = None
    prompt_tokens: int = 1000
    new_tokens: int = 8
    prompt_runs: int = 2  # the first is a warm-up (lazy kernel loading); times come from the last
    image: str | None = None
    batches: list[int] = field(default_factory=lambda: [1, 8])
    decode_steps: int = 32
    decode_warmup: int = 3
    card_gib: float | None = None
    compile_mode: str | None = None
    bandwidth_bytes: int = GIB


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- env -------------------------------------------------------------------------------------------------------
def copy_bandwidth(device, nbytes: int, iters: int = 10) -> dict:
    """Bytes read + written per second by ``dst.copy_(src)`` of ``nbytes`` (median of ``iters`` copies)."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(iters + 2):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 2:  # two warm-ups
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"bandwidth_bytes_per_s": 2 * nbytes / step, "bandwidth_copy_bytes": nbytes, "bandwidth_copies": iters}


def nvml_reader(device):
    """A :class:`profiling.memory_sampler` source for ``device`` (NVML on CUDA, RSS otherwise) and its note."""
    from .memory_sampler import open_source

    return open_source(str(device))


def cuda_context_bytes(device) -> dict:
    """What the CUDA context takes beside torch's allocator right after initialisation (NVML − torch reserved).
    Call before anything else touches CUDA in this process."""
    import torch

    source, note = nvml_reader(device)
    before = source.read()[1] if source.name == "nvml" else None
    torch.zeros(1, device=device)
    torch.cuda.synchronize(device)
    _, dev_used, proc_used = source.read()
    source.close()
    reserved = torch.cuda.memory_reserved(device)
    if proc_used is not None:
        return {"cuda_context_bytes": proc_used - reserved, "cuda_context_source": "NVML process used − torch reserved"}
    if before is not None and dev_used is not None:
        return {"cuda_context_bytes": dev_used - before - reserved, "cuda_context_source": "NVML device used delta"}
    return {"cuda_context_bytes": None, "cuda_context_source": note}


def bnb_smoke(device) -> dict:
    """One nf4 and one int8 Linear forward on ``device``: do bitsandbytes' kernels load and run here?"""
    import torch

    out = {}
    try:
        import bitsandbytes as bnb

        out["bnb_version"] = bnb.__version__
        x = torch.randn(4, 256, dtype=torch.bfloat16)
        for name, make in (
            ("nf4", lambda: bnb.nn.Linear4bit(256, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")),
            ("int8", lambda: bnb.nn.Linear8bitLt(256, 256, bias=False, has_fp16_weights=False)),
        ):
            try:
                layer = make().to(device)
                y = layer(x.to(device))
                _sync(device)
                out[f"bnb_{name}"] = "ok" if bool(torch.isfinite(y.float()).all()) else "non-finite output"
            except Exception as e:  # recorded, not fatal: the configuration rows will say more
                out[f"bnb_{name}"] = f"{type(e).__name__}: {e}"[:300]
    except Exception as e:
        out["bnb_version"] = None
        out["bnb_import"] = f"{type(e).__name__}: {e}"[:300]
    return out


def run_env(spec: StepSpec) -> dict:
    import torch

    from quant.loader import resolve_device

    from .system_info import machine_info, package_version

    out = machine_info()
    for pkg in ("fastapi", "starlette", "uvicorn", "pydantic", "pydantic-core", "accelerate", "numpy"):
        out[pkg.replace("-", "_")] = package_version(pkg)
    out["python_executable"] = sys.executable
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    imports = {}
    for mod in ("fastapi", "uvicorn", "pydantic", "bitsandbytes"):
        try:
            __import__(mod)
            imports[mod] = "ok"
        except Exception as e:
            imports[mod] = f"{type(e).__name__}: {e}"[:300]
    out["imports"] = imports
    if spec.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {spec.device}, but torch {torch.__version__} sees no CUDA device")
        out.update(cuda_context_bytes(torch.device(spec.device)))
    device = resolve_device(spec.device)
    out["device"] = str(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(
            gpu_name=torch.cuda.get_device_name(device),
            gpu_capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            gpu_multiprocessors=props.multi_processor_count,
            gpu_total_bytes=props.total_memory,
        )
    emit("partial", fields=out)
    out.update(bnb_smoke(device))
    emit("partial", fields=out)
    out.update(copy_bandwidth(device, spec.bandwidth_bytes))
    out["bandwidth_how"] = ("device-to-device" if device.type == "cuda" else "host memcpy") + " copy, read + write"
    return out


# ---- config ----------------------------------------------------------------------------------------------------
def load(spec: StepSpec, device):
    from quant.request import LoadRequest, open_model

    return open_model(
        LoadRequest(
            synthetic=spec.synthetic,
            precision=spec.precision,
            vision_precision=spec.vision_precision,
            device=str(device),
            offload=tuple(spec.offload),
            lm_head_precision=spec.lm_head_precision,
        )
    )


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def set_cap(device, fraction: float) -> None:
    import torch

    torch.cuda.set_per_process_memory_fraction(fraction, device)


def prompt_inputs(lm, spec: StepSpec) -> tuple[list[int], int, bytes | None]:
    """(prompt ids, expanded length, image bytes): ``prompt_tokens`` text tokens (never more than leaves room in
    the model's context for the answer and the decode timings) and the image."""
    from glm4v import expanded_length

    from .profile_worker import profile_prompt

    image = Path(spec.image).read_bytes() if spec.image else None
    image_tokens = lm.image_tokens() if image is not None else 0
    room = lm.config.seq_length - image_tokens - spec.new_tokens - spec.decode_warmup - spec.decode_steps - 16
    ids = profile_prompt(lm.tokenizer, max(1, min(spec.prompt_tokens, room)), image is not None)
    return ids, expanded_length(len(ids), image_tokens), image


def answer_prompt(lm, spec: StepSpec, ids, image, sampler, allocator) -> dict:
    """``prompt_runs`` greedy answers of ``new_tokens`` to one image + prompt; timings of the last run."""
    import torch

    from glm4v import SamplingParams, expanded_length
    from glm4v.generate import generate

    from .hooks import Fanout
    from .timing import RequestTimer

    sync = (lambda: torch.cuda.synchronize(lm.device)) if lm.device.type == "cuda" else None
    params = SamplingParams(max_new_tokens=spec.new_tokens, temperature=0.0, ignore_eos=True)
    max_len = expanded_length(len(ids), lm.image_tokens() if image is not None else 0) + spec.new_tokens + 8
    streamer = getattr(lm.model.transformer.vision, "streamer", None)
    copied = streamer.bytes_copied if streamer is not None else 0
    timing = None
    for _ in range(max(1, spec.prompt_runs)):
        timer = RequestTimer(sync)
        hooks = Fanout(timer, sampler, allocator)
        hooks.on_event("request_start")
        pixels = lm.image_processor(image) if image is not None else None
        hooks.on_event("preprocess_end")
        with torch.inference_mode():
            for _step in generate(lm.model, lm.tokenizer, ids, pixels, params, max_len=max_len, hooks=hooks):
                pass
        hooks.on_event("end")
        timing = timer.result()
    out = {
        "vision_encode_s": timing.vision_encode_s,
        "prefill_s": timing.prefill_s,
        "ttft_s": timing.ttft_s,
        "prompt_decode_tokens_per_s": timing.decode_tokens_per_s,
    }
    if streamer is not None:
        out["stream_bytes_per_image"] = (streamer.bytes_copied - copied) // max(1, spec.prompt_runs)
        out["stream_max_resident_units"] = streamer.max_resident_units
    return out


def decode_bytes_per_step(lm, batch: int, entries: int) -> int:
    """What one decode step reads: every LM weight (quantization state included) once, and each row's KV cache."""
    from quant.memory import weight_bytes

    t = lm.model.transformer
    weights = weight_bytes(t.encoder)["total"] + weight_bytes(t.output_layer)["total"]
    c = lm.config
    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * lm.spec.dtype.itemsize
    return weights + batch * entries * kv_per_token


def time_decode(lm, spec: StepSpec, context: int, mode: str | None = None) -> dict:
    """The engine's decode step at each batch size with ``context`` cache entries per row, as bench-decode times it
    (one forward for the batch, the greedy tokens read back each step). ``mode``: a ``--compile`` mode, compiled for
    the measured batch sizes only (serve compiles every bucket 1, 2, 4 … max; each is its own graph)."""
    import torch

    from engine.cuda_graphs import DecodeGraphs

    from .profile_worker import cpu_snapshot, other_cpu_share

    model, device, batches = lm.model, lm.device, sorted(set(spec.batches))
    max_len = -(-(context + spec.decode_warmup + spec.decode_steps + 2) // 256) * 256
    cache = model.new_cache(max_len=max_len, max_batch=max(batches))
    suffix = "_compiled" if mode else ""
    out, graphs = {}, None
    if mode:
        graphs = DecodeGraphs(model, cache, mode, kv_step=max_len)  # one window: the whole row
        out.update(compile_mode=mode, compile_s=0.0)
    start = cpu_snapshot()
    with torch.inference_mode():
        for b in batches:
            cache.reset()
            if graphs is not None:  # compile (and capture) this batch size now: a run cut short keeps the earlier ones
                out["compile_s"] += graphs.warmup(buckets=[b])
            for r in range(b):
                cache.lengths[r] = cache.next_positions[r] = context
            tokens, times = [100 + r for r in range(b)], []
            for i in range(spec.decode_warmup + spec.decode_steps):
                _sync(device)
                t0 = time.perf_counter()
                if graphs is not None:
                    logits = graphs.decode(tokens)
                else:
                    ids = torch.tensor(tokens, device=device)[:, None]
                    logits = model(ids, cache=cache, cache_row=0, logits_to_keep=1).logits[:, -1]
                tokens = logits.argmax(-1).tolist()
                if i >= spec.decode_warmup:
                    times.append(time.perf_counter() - t0)
            step = sorted(times)[len(times) // 2]
            read = decode_bytes_per_step(lm, b, context + spec.decode_warmup + spec.decode_steps // 2)
            out[f"decode_step_ms_b{b}{suffix}"] = step * 1e3
            out[f"decode_tok_s_b{b}{suffix}"] = b / step
            out[f"decode_bytes_per_step_b{b}"] = read
            out[f"decode_bytes_per_s_b{b}{suffix}"] = read / step
            emit("partial", fields=dict(out))
    out["decode_context"] = context
    # 0–1 of the machine's cores busy with other processes while timing: a shared CPU makes the timings meaningless.
    out[f"decode_other_cpu_share{suffix}"] = other_cpu_share(start, cpu_snapshot())
    return out


def run_config(spec: StepSpec) -> dict:
    import torch

    from quant.estimate import CUDA_CONTEXT_BYTES
    from quant.loader import resolve_device

    from .memory_sampler import MemorySampler
    from .profile_worker import make_resident
    from .torch_memory import TorchAllocatorPeaks

    cuda = spec.device.startswith("cuda")
    row: dict = {}
    card_bytes = None
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"--device {spec.device}, but torch {torch.__version__} sees no CUDA device")
    if spec.card_gib and cuda:
        row.update(cuda_context_bytes(torch.device(spec.device)))
        device = resolve_device(spec.device)
        card_bytes = int(spec.card_gib * GIB)
        context = max(row["cuda_context_bytes"] or 0, CUDA_CONTEXT_BYTES)
        total = torch.cuda.get_device_properties(device).total_memory
        cap = card_bytes - context
        row.update(card_gib=spec.card_gib, card_cap_bytes=cap, card_fraction=cap / total)
        set_cap(device, cap / total)
    else:
        device = resolve_device(spec.device)
        if spec.card_gib:
            row.update(card_gib=spec.card_gib, card_status="skipped", card_note="card emulation needs CUDA")
    sampler = MemorySampler(str(device), 0.01).start()
    allocator = TorchAllocatorPeaks(str(device))
    row["memory_source"] = sampler.memory_source
    sampler.set_phase("load")
    allocator.set_phase("load")

    def lift(where: str, error: str) -> None:
        # Called after the except block: the exception's frames (holding the half-built model or the prompt's
        # activations) are gone, so the memory is free again. The cap comes off and the step goes on uncapped.
        row.update(card_status="fail", card_failed_at=where, card_error=error[:400])
        emit("partial", fields=row)
        set_cap(device, 1.0)
        _free(device)

    t0, lm, failed = time.perf_counter(), None, None
    try:
        lm = load(spec, device)
    except Exception as e:
        if card_bytes is None or not is_oom(e):
            raise
        failed = f"{type(e).__name__}: {e}"
    if lm is None:
        lift("load", failed)
        t0 = time.perf_counter()
        lm = load(spec, device)
    _sync(device)
    row["load_s"] = time.perf_counter() - t0
    if device.type == "cpu":
        make_resident(lm.model)
    sampler.set_phase("idle")
    allocator.set_phase("idle")
    time.sleep(0.2)
    placement = lm.placement()
    row.update(
        device=str(device),
        label=lm.spec.label(),
        weight_bytes=lm.weight_bytes["total"],
        resident_bytes=placement["resident_bytes"],
        host_bytes=placement["host_bytes"],
        streaming_buffer_bytes=placement["streaming_buffer_bytes"],
        used_after_load_bytes=sampler.source.read()[0],
        torch_allocated_after_load_bytes=torch.cuda.memory_allocated(device) if device.type == "cuda" else None,
        torch_reserved_after_load_bytes=torch.cuda.memory_reserved(device) if device.type == "cuda" else None,
    )
    emit("partial", fields=row)

    ids, expanded, image = prompt_inputs(lm, spec)
    row.update(prompt_tokens=len(ids), prompt_entries=expanded, with_image=image is not None)
    answered, failed = None, None
    try:
        answered = answer_prompt(lm, spec, ids, image, sampler, allocator)
    except Exception as e:
        if card_bytes is None or not is_oom(e) or row.get("card_status") == "fail":
            raise
        failed = f"{type(e).__name__}: {e}"
    if answered is None:
        lift("prompt", failed)
        answered = answer_prompt(lm, spec, ids, image, sampler, allocator)
    row.update(answered)
    allocator.set_phase("done")
    sampler.set_phase("done")
    sampler.stop()
    mem = sampler.summary()
    peaks = allocator.summary()
    row.update(
        peak_used_bytes=mem["peak_memory_bytes"],
        load_peak_used_bytes=mem["load_peak_bytes"],
        torch_allocated_peak_bytes=peaks["torch_allocated_peak_bytes"],
        torch_reserved_peak_bytes=peaks["torch_reserved_peak_bytes"],
        memory_source_note=mem["memory_source_note"],
    )
    if card_bytes is not None:
        used = max(v for v in (mem["peak_memory_bytes"], mem["load_peak_bytes"], 0) if v is not None)
        row["card_peak_used_bytes"] = used
        if row.get("card_status") != "fail":
            over = mem["memory_source"] == "nvml" and used > card_bytes
            row["card_status"] = "fail" if over else "pass"
            if over:
                row["card_failed_at"] = "NVML peak above the card"
        set_cap(device, 1.0)
        _free(device)
    emit("partial", fields=row)
    row.update(time_decode(lm, spec, expanded))
    return row


def run_compile(spec: StepSpec) -> dict:
    from quant.loader import resolve_device

    device = resolve_device(spec.device)
    t0 = time.perf_counter()
    lm = load(spec, device)
    out = {"compile_load_s": time.perf_counter() - t0}
    _, expanded, _ = prompt_inputs(lm, spec)
    out.update(time_decode(lm, spec, expanded, spec.compile_mode))
    out.pop("decode_context", None)
    return {k: v for k, v in out.items() if not k.startswith("decode_bytes_per_step")}


STEPS = {"env": run_env, "config": run_config, "compile": run_compile}


def main(argv: list[str] | None = None) -> int:
    return worker_main(argv, "profiling.gpu_check_worker", StepSpec, lambda spec: STEPS[spec.kind](spec), "fields")


if __name__ == "__main__":
    raise SystemExit(main())
