"""One profile configuration, run in a fresh process: load, idle reading, warm-up, timed repeats, one result row.

``glm4v-edge profile`` starts ``python -m profiling.profile_worker '<RunSpec JSON>'`` once per configuration so
that no configuration inherits another's CUDA context, allocator cache or heap (VRAM readings stay clean). The
worker speaks a line protocol on stdout: ``@@profile {"event": "progress", ...}`` while running and one
``@@profile {"event": "result", "row": {...}}`` at the end. Everything else goes to stderr (the per-run log).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROTOCOL_PREFIX = "@@profile "
PROFILE_QUESTION = "Describe the image in detail."
FILLER = " The quick brown fox jumps over the lazy dog while the sky is blue and the grass is green."

log = logging.getLogger("profiling.worker")


@dataclass
class RunSpec:
    """Everything a worker needs; JSON-serialisable so it can travel on the command line."""

    precision: str
    vision_precision: str | None = None
    vision_size: int | None = None
    model: str | None = None
    synthetic: str | None = None
    compute_dtype: str | None = None
    double_quant: bool = True
    device: str | None = None
    offload: str = "none"
    lm_head_precision: str | None = None
    prompt_tokens: int = 64
    new_tokens: int = 32
    image: str | None = None  # None = text-only prompt
    warmup: int = 1
    repeat: int = 3
    sample_interval_s: float = 0.01
    idle_window_s: float = 0.3
    role: str = "config"  # "config" or "baseline"
    command: str = ""
    extra: dict = field(default_factory=dict)


def emit(event: str, **payload) -> None:
    sys.stdout.write(PROTOCOL_PREFIX + json.dumps({"event": event, **payload}) + "\n")
    sys.stdout.flush()


def profile_prompt(tokenizer, n_tokens: int, with_image: bool) -> list[int]:
    """A generation prompt of ``n_tokens`` text ids (chat template included; the image adds its embeddings on top),
    padded with filler text at the end of the question. Never shorter than the bare template + question."""
    from glm4v import Message, generation_prompt
    from glm4v.chat_template import generation_suffix

    base = generation_prompt(tokenizer, [Message("user", PROFILE_QUESTION, has_image=with_image)]).ids
    need = n_tokens - len(base)
    if need <= 0:
        return base
    filler_ids = tokenizer.encode(FILLER)
    filler = (filler_ids * (need // len(filler_ids) + 1))[:need]
    tail = len(generation_suffix(tokenizer))
    return base[:-tail] + filler + base[-tail:]


def cpu_snapshot() -> tuple[float, float, float]:
    """(all processes' busy CPU seconds, this process's CPU seconds, wall clock) — to tell afterwards how much of
    the machine other work took during the timed runs (a shared CPU makes timings meaningless, say so)."""
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)
    own = psutil.Process().cpu_times()
    return busy, own.user + own.system, time.perf_counter()


def other_cpu_share(start: tuple[float, float, float], end: tuple[float, float, float]) -> float:
    import os

    busy, own, wall = (b - a for a, b in zip(start, end, strict=True))
    return max(0.0, (busy - own) / (wall * (os.cpu_count() or 1))) if wall > 0 else 0.0


def make_resident(model) -> None:
    """Read one byte per page of every weight. On the CPU, safetensors weights stay memory-mapped and only become
    resident when first used, so without this the RSS "idle after load" would leave out most of the weights and
    the first request's peak would include them."""
    for t in list(model.parameters()) + list(model.buffers()):
        flat = t.detach().reshape(-1)
        flat[:: max(1, 4096 // t.element_size())].sum()


def load_request(spec: RunSpec):
    from quant.offload import parse_offload
    from quant.request import LoadRequest

    return LoadRequest(
        model=spec.model,
        synthetic=spec.synthetic,
        precision=spec.precision,
        vision_precision=spec.vision_precision,
        device=spec.device,
        vision_size=spec.vision_size,
        compute_dtype=spec.compute_dtype,
        double_quant=spec.double_quant,
        offload=parse_offload(spec.offload),
        lm_head_precision=spec.lm_head_precision,
    )


def load_model(spec: RunSpec):
    from quant.request import open_model

    return open_model(load_request(spec))


def run(spec: RunSpec) -> dict:
    import torch

    from glm4v import SamplingParams, expanded_length
    from glm4v.generate import generate
    from quant.estimate import estimate
    from quant.loader import resolve_device

    from .hooks import Fanout
    from .memory_sampler import MemorySampler, rss_breakdown
    from .rows import ProfileRow
    from .system_info import machine_info
    from .timing import RequestTimer, summarize
    from .torch_memory import TorchAllocatorPeaks

    device = str(resolve_device(spec.device))  # the sampler must watch the device the model will load on
    spec.device = device
    sampler = MemorySampler(device, spec.sample_interval_s).start()
    allocator = TorchAllocatorPeaks(device)
    sampler.set_phase("load")
    allocator.set_phase("load")
    t0 = time.perf_counter()
    lm = load_model(spec)
    load_s = time.perf_counter() - t0
    if lm.device.type == "cpu":
        make_resident(lm.model)
    sync = (lambda: torch.cuda.synchronize(lm.device)) if lm.device.type == "cuda" else None

    sampler.set_phase("idle")
    allocator.set_phase("idle")
    time.sleep(spec.idle_window_s)  # the idle-after-load reading is the median over this window
    host_idle = rss_breakdown()

    ids = profile_prompt(lm.tokenizer, spec.prompt_tokens, spec.image is not None)
    image_tokens = lm.image_tokens() if spec.image else 0
    expanded = expanded_length(len(ids), image_tokens)
    params = SamplingParams(max_new_tokens=spec.new_tokens, temperature=0.0, ignore_eos=True)
    max_len = expanded + spec.new_tokens + 8
    image_bytes = Path(spec.image).read_bytes() if spec.image else None

    timings = []
    total = spec.warmup + spec.repeat
    cpu_start = None
    for i in range(total):
        measured = i >= spec.warmup
        if i == spec.warmup:
            cpu_start = cpu_snapshot()
        timer = RequestTimer(sync)
        if measured:
            hooks = Fanout(timer, sampler, allocator)
        else:
            sampler.set_phase("warmup")
            hooks = timer
        hooks.on_event("request_start")
        pixels = lm.image_processor(image_bytes) if image_bytes is not None else None
        hooks.on_event("preprocess_end")
        with torch.inference_mode():
            for _ in generate(lm.model, lm.tokenizer, ids, pixels, params, max_len=max_len, hooks=hooks):
                pass
        hooks.on_event("end")
        if measured:
            timings.append(timer.result())
        emit("progress", done=i + 1, total=total, note=("repeat" if measured else "warm-up") + f" {i + 1}/{total}")
    cpu_share = other_cpu_share(cpu_start, cpu_snapshot())
    sampler.set_phase("done")  # not "idle": that reading is the window after load only
    sampler.stop()

    est = estimate(
        lm.config,
        precision=lm.spec.precision,
        vision_precision=lm.spec.vision_precision,
        vision_size=lm.vision_size,
        context=max_len,
        batch=1,
        device=lm.device.type,
        compute_dtype=spec.compute_dtype,
        double_quant=spec.double_quant,
        prompt_tokens=expanded,
        lm_head_precision=lm.spec.lm_head_precision,
        offload=lm.offload,
    )
    row = ProfileRow.from_dict(
        {
            "label": lm.spec.label() + f"@{lm.vision_size}",
            "role": spec.role,
            "status": "ok",
            "precision": lm.spec.precision,
            "vision_precision": lm.spec.vision_precision,
            "vision_size": lm.vision_size,
            "device": str(lm.device),
            "model": str(lm.model_dir),
            "synthetic": spec.synthetic,
            "dtype": lm.spec.describe()["dtype"],
            "double_quant": spec.double_quant,
            "prompt_tokens": len(ids),
            "image_tokens": image_tokens,
            "prompt_tokens_expanded": expanded,
            "with_image": spec.image is not None,
            "warmup": spec.warmup,
            "repeat": spec.repeat,
            "load_s": load_s,
            **summarize(timings),
            **sampler.summary(),
            **allocator.summary(),
            "weight_bytes": lm.weight_bytes["total"],
            "estimated_bytes": est.total_bytes,
            "estimated_weights_bytes": est.weights_bytes,
            "estimated_activation_peak_bytes": est.activation_peak_bytes,
            "estimate": est.to_dict(),
            "layers": lm.describe()["layers"],
            "host_memory_idle": host_idle,  # RSS split into anonymous and file-backed pages, after load (Linux)
            "other_cpu_share": cpu_share,  # 0–1 of all cores used by other processes during the timed runs
            "notes": list(lm.spec.notes),
        }
    )
    idle = row.idle_memory_bytes
    for phase in ("vision", "prefill", "decode"):  # growth above idle-after-load: the phase's activations
        peak = getattr(row, f"{phase}_peak_bytes")
        setattr(row, f"{phase}_above_idle_bytes", peak - idle if peak is not None and idle is not None else None)
    if row.memory_source == "nvml" and row.torch_reserved_peak_bytes and row.process_used_peak_bytes:
        # What torch cannot see: CUDA context, cuBLAS workspace, allocator slack outside the reserved pool.
        row.context_and_slack_bytes = row.process_used_peak_bytes - row.torch_reserved_peak_bytes
    machine = machine_info()
    machine.update({k: v for k, v in sampler.device_info.items() if v is not None})
    row.machine = machine
    row.command = spec.command
    row.worker_spec = asdict(spec)
    return row.to_dict()


def is_oom(e: BaseException) -> bool:
    return "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"


def worker_main(argv: list[str] | None, module: str, spec_type, run_spec, result_key: str) -> int:
    """The entry point of a measuring subprocess (``profile``'s and ``gpu-check``'s): one JSON spec on the command
    line; the result, or the error (``oom`` told apart), as protocol lines on stdout; logs on stderr."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if len(argv) != 1:
        print(f"usage: python -m {module} '<{spec_type.__name__} JSON>'", file=sys.stderr)
        return 2
    spec = spec_type(**json.loads(argv[0]))
    log.info("spec %s", json.dumps(asdict(spec)))
    try:
        result = run_spec(spec)
    except Exception as e:
        traceback.print_exc()
        emit("error", status="oom" if is_oom(e) else "error", error=f"{type(e).__name__}: {e}"[:1000])
        return 1
    emit("result", **{result_key: result})
    return 0


def main(argv: list[str] | None = None) -> int:
    return worker_main(argv, "profiling.profile_worker", RunSpec, run, "row")


if __name__ == "__main__":
    raise SystemExit(main())
