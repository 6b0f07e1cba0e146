"""The rows the profiling tools write, one dataclass per JSON-lines file: the schema docs/PROFILING.md documents.

* :class:`ProfileRow` — ``profile``'s results.jsonl (and results.csv, flattened)
* :class:`EvalRow` — ``eval``'s results.jsonl; :class:`AnswerRow` — its answers.jsonl
* :class:`ReportRow` — ``report``'s report.jsonl

Identity fields come first and are required; every other field defaults to None. Some fields are written only on
one path (a failed profile row has no timings, an NVML reading exists only on a GPU, an HTTP eval row has no
device): their ``when`` (field metadata) says when, and :meth:`Row.to_dict` leaves them out otherwise, so the JSON
is exactly what the tools wrote before these classes existed. :meth:`Row.from_dict` rejects a key the class does
not declare — adding a field to a row without adding it here (and to the docs) fails loudly — and a conditional
key given where it would not be written. A test holds the tables in docs/PROFILING.md to these fields, in order.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields


def _only(when: str):
    """A field written only when ``when`` holds for the row (see each class's ``_holds``); "set" = not None."""
    return field(default=None, metadata={"when": when})


class Row:
    """Strict loading from a dict and the JSON the tools write; subclasses are dataclasses."""

    def _holds(self, when: str) -> bool:
        raise ValueError(f"{type(self).__name__}: unknown condition {when!r}")

    def _written(self, f) -> bool:
        when = f.metadata.get("when")
        if when is None:
            return True
        return getattr(self, f.name) is not None if when == "set" else self._holds(when)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict):
        names = cls.field_names()
        unknown = [k for k in d if k not in names]
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown field(s) {', '.join(map(repr, unknown))}; declare new fields "
                f"in profiling/rows.py and document them in docs/PROFILING.md"
            )
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in d]
        if missing:
            raise ValueError(f"{cls.__name__}: missing required field(s) {', '.join(map(repr, missing))}")
        row = cls(**d)
        by_name = {f.name: f for f in fields(cls)}
        dropped = [k for k in d if not row._written(by_name[k])]
        if dropped:
            which = ", ".join(f"{k!r} (written only when {by_name[k].metadata['when']})" for k in dropped)
            raise ValueError(
                f"{cls.__name__} {d.get('label', d.get('config'))!r}: {which} given for a row that does not write it"
            )
        return row

    def to_dict(self) -> dict:
        """The row as written to JSON: fields in declaration order, conditional ones only when they apply."""
        return {f.name: getattr(self, f.name) for f in fields(self) if self._written(f)}


@dataclass(kw_only=True)
class ProfileRow(Row):
    """``profile`` results.jsonl: one configuration, measured in its own worker process (status "ok") or failed."""

    label: str  # configuration: precision, "+vision-<precision>" if the tower differs, "@<vision size>"
    role: str  # "config" (asked for) or "baseline" (the fp16 run added for the comparison)
    status: str  # "ok", or how the worker failed: "error", "oom", "timeout"
    precision: str  # language-model weights: fp32, bf16, fp16, int8, nf4, fp4
    vision_precision: str  # vision-tower weights (same names)
    vision_size: int  # image side fed to the vision tower, pixels
    device: str  # torch device ("cpu", "cuda", "cuda:0")
    model: str | None = None  # checkpoint folder, or "synthetic/<preset>"
    synthetic: str | None = _only("ok")  # --synthetic preset (random weights); null for a checkpoint
    dtype: str | None = _only("ok")  # torch dtype of the unquantized parts and of compute
    double_quant: bool | None = _only("ok")  # 4-bit: the quantization constants are quantized too
    prompt_tokens: int | None = _only("ok")  # text tokens of the prompt, chat template included
    image_tokens: int | None = _only("ok")  # positions the image adds (0 = text-only prompt)
    prompt_tokens_expanded: int | None = _only("ok")  # positions prefilled: text + image tokens
    with_image: bool | None = _only("ok")  # whether the prompt carried an image
    warmup: int | None = _only("ok")  # untimed runs before the timed ones
    repeat: int | None = _only("ok")  # timed runs
    load_s: float | None = _only("ok")  # load (and quantize) time, seconds
    preprocess_s: float | None = _only("ok")  # image decode, resize, normalize; seconds, median over runs
    vision_encode_s: float | None = _only("ok")  # vision tower + projector; seconds, median (null without image)
    prefill_s: float | None = _only("ok")  # prefill start → first token, vision included; seconds, median
    ttft_s: float | None = _only("ok")  # request start → first token (time to first token); seconds, median
    e2e_s: float | None = _only("ok")  # request start → end; seconds, median
    decode_tokens_per_s: float | None = _only("ok")  # tokens after the first per second of decoding; median
    new_tokens: float | None = _only("ok")  # tokens generated per run (median, hence a float)
    token_latency_ms_p50: float | None = _only("ok")  # decode step latency, median over all timed steps, ms
    token_latency_ms_p90: float | None = _only("ok")  # decode step latency, 90th percentile, ms
    token_latency_ms_p99: float | None = _only("ok")  # decode step latency, 99th percentile, ms
    ttft_s_runs: list[float | None] | None = _only("ok")  # ttft_s of each timed run, seconds
    decode_tokens_per_s_runs: list[float | None] | None = _only("ok")  # decode_tokens_per_s of each timed run
    memory_source: str | None = _only("ok")  # "nvml" (GPU memory) or "rss" (the worker's host resident set)
    memory_source_note: str | None = _only("ok")  # why that source (e.g. no NVML library)
    idle_memory_bytes: int | None = _only("ok")  # after load, before any request (median of a window), bytes
    peak_memory_bytes: int | None = _only("ok")  # peak during the timed requests, bytes
    vision_peak_bytes: int | None = _only("ok")  # peak during the vision encode, bytes
    prefill_peak_bytes: int | None = _only("ok")  # peak during vision encode + prefill, bytes
    decode_peak_bytes: int | None = _only("ok")  # peak during decode, bytes
    load_peak_bytes: int | None = _only("ok")  # peak while loading, bytes
    memory_samples: int | None = _only("ok")  # memory readings taken
    sample_interval_s: float | None = _only("ok")  # time between readings, seconds
    device_used_idle_bytes: int | None = _only("nvml")  # whole GPU used (other processes too) after load, bytes
    device_used_peak_bytes: int | None = _only("nvml")  # whole GPU used, peak during the requests, bytes
    process_used_idle_bytes: int | None = _only("nvml")  # this process on the GPU after load (null if hidden)
    process_used_peak_bytes: int | None = _only("nvml")  # this process on the GPU, peak during requests, bytes
    torch_allocated_idle_bytes: int | None = _only("ok")  # torch CUDA tensors after load (null on CPU), bytes
    torch_allocated_peak_bytes: int | None = _only("ok")  # torch tensors, peak during the requests, bytes
    torch_reserved_peak_bytes: int | None = _only("ok")  # torch caching allocator's pool, peak, bytes
    torch_allocated_prefill_peak_bytes: int | None = _only("cuda")  # torch tensors, vision + prefill peak, bytes
    torch_allocated_decode_peak_bytes: int | None = _only("cuda")  # torch tensors, decode peak, bytes
    weight_bytes: int | None = _only("ok")  # loaded weights incl. quantization state, exact, bytes
    estimated_bytes: int | None = None  # estimator's total for this configuration, bytes
    estimated_weights_bytes: int | None = _only("ok")  # estimator: weights, bytes
    estimated_activation_peak_bytes: int | None = _only("ok")  # estimator: activation peak, bytes
    estimate: dict | None = _only("ok")  # the whole estimate (the fields of `estimate --json`)
    layers: dict | None = _only("ok")  # Linear classes present (4-bit applied?), {"language_model": {"Linear4bit": 8}}
    host_memory_idle: dict | None = _only("ok")  # RSS after load: rss_anon_bytes, rss_file_bytes (Linux), bytes
    other_cpu_share: float | None = _only("ok")  # share (0–1) of all cores other processes used while timed
    notes: list[str] | None = _only("ok")  # the loader's notes (e.g. layers kept unquantized)
    vision_above_idle_bytes: int | None = _only("ok")  # vision_peak_bytes − idle_memory_bytes, bytes
    prefill_above_idle_bytes: int | None = _only("ok")  # prefill_peak_bytes − idle_memory_bytes, bytes
    decode_above_idle_bytes: int | None = _only("ok")  # decode_peak_bytes − idle_memory_bytes, bytes
    context_and_slack_bytes: int | None = _only("set")  # NVML process peak − torch reserved peak, bytes
    machine: dict | None = _only("ok")  # host, os, cpu, cores, RAM, GPU name/driver/memory, library versions
    command: str | None = None  # the exact command line
    worker_spec: dict | None = _only("ok")  # every setting the worker ran with (RunSpec)
    error: str | None = _only("failed")  # "<exception type>: <message>", or what killed the worker
    log: str | None = _only("failed")  # path of the worker's log
    log_tail: list[str] | None = _only("failed")  # the log's last 3 lines
    baseline_label: str | None = _only("baseline")  # label of the fp16 baseline
    baseline_source: str | None = _only("baseline")  # "measured" or "estimated"
    baseline_peak_memory_bytes: int | None = _only("baseline")  # baseline's peak (its estimate if estimated)
    baseline_memory_source: str | None = _only("baseline")  # baseline's memory_source; "estimate" if estimated
    baseline_decode_tokens_per_s: float | None = _only("baseline")  # baseline's decode speed; null if estimated
    baseline_ttft_s: float | None = _only("baseline")  # baseline's ttft_s, seconds; null if estimated
    baseline_reason: str | None = _only("estimated baseline")  # why the baseline was not measured
    memory_vs_baseline: float | None = _only("baseline")  # peak_memory_bytes ÷ baseline_peak_memory_bytes
    speed_vs_baseline: float | None = _only("baseline")  # decode_tokens_per_s ÷ the baseline's
    ttft_vs_baseline: float | None = _only("baseline")  # ttft_s ÷ the baseline's

    def _holds(self, when: str) -> bool:
        ok = self.status == "ok"
        conditions = {
            "ok": ok,
            "failed": not ok,
            "nvml": ok and self.memory_source == "nvml",
            "cuda": ok and str(self.device).startswith("cuda"),
            "baseline": self.baseline_source is not None,
            "estimated baseline": self.baseline_source == "estimated",
        }
        return conditions[when] if when in conditions else super()._holds(when)


@dataclass(kw_only=True)
class EvalRow(Row):
    """``eval`` results.jsonl: one configuration (``--model``) or one server (``--base-url``)."""

    label: str  # configuration label (as in ProfileRow), or "<served model> @ <base URL>"
    precision: str  # language-model precision; over HTTP what /v1/models reports, else "unknown"
    vision_precision: str | None  # vision-tower precision (null when a server does not report it)
    vision_size: int | None  # image side, pixels (null when a server does not report it)
    device: str | None = _only("local")  # torch device
    served_model: str | None = _only("http")  # model name requested from the server
    base_url: str | None = _only("http")  # the server's OpenAI base URL (…/v1)
    load_s: float | None = _only("local")  # load (and quantize) time, seconds
    weight_bytes: int | None = _only("local")  # loaded weights incl. quantization state, bytes
    estimated_bytes: int | None = _only("local")  # estimator's total memory, bytes
    is_reference: bool | None = None  # whether this row is the reference the others are compared with
    reference: str | None = None  # reference precision (local) or the reference server's label (HTTP)
    reference_label: str | None = None  # the reference's label
    kl_mean: float | None = None  # mean per-token KL(reference ‖ this), teacher-forced, nats; null over HTTP
    kl_median: float | None = None  # median per-token KL, nats
    kl_p99: float | None = None  # 99th-percentile per-token KL, nats
    kl_max: float | None = None  # largest per-token KL, nats
    top1_agreement: float | None = None  # share (0–1) of answer positions whose argmax matches the reference's
    delta_p_rms: float | None = None  # RMS change of the reference token's probability
    n_tokens: int | None = None  # answer tokens compared (the reference's greedy answers); null over HTTP
    greedy_match: float | None = None  # share (0–1) of items answered exactly as the reference did
    eval_s: float | None = None  # time to answer (and score) every item, seconds
    note: str | None = _only("http")  # why KL and top-1 are missing over HTTP
    accuracy: float | None = None  # share (0–1) of items answered correctly (normalized match)
    accuracy_ci_low: float | None = None  # 95% Wilson interval of accuracy, low end
    accuracy_ci_high: float | None = None  # 95% Wilson interval of accuracy, high end
    accuracy_exact: float | None = None  # share (0–1) matching an accepted answer exactly
    accuracy_relaxed: float | None = None  # share (0–1) containing an accepted answer as whole words
    accuracy_by_category: dict[str, float] | None = None  # accuracy per item category
    n_items: int | None = None  # items asked
    n_correct: int | None = None  # items answered correctly (normalized match)
    task: str | None = None  # task sets, comma-separated ("synthetic" or JSONL paths)
    machine: dict | None = None  # where it ran (as in ProfileRow)
    command: str | None = None  # the exact command line

    def _holds(self, when: str) -> bool:
        if when in ("local", "http"):
            return (self.base_url is None) == (when == "local")
        return super()._holds(when)


@dataclass(kw_only=True)
class AnswerRow(Row):
    """``eval`` answers.jsonl: one item answered by one configuration."""

    config: str  # the configuration's label (EvalRow.label)
    id: str  # item id
    category: str  # item category (synthetic kind, or the JSONL set's category)
    question: str  # the question, without the short-answer instruction
    answers: list[str]  # accepted answers
    prediction: str  # the configuration's greedy answer, stripped
    correct: bool  # normalized match with an accepted answer


@dataclass(kw_only=True)
class ReportRow(Row):
    """``report`` report.jsonl: one configuration, profile and eval rows joined; every field always written."""

    label: str  # configuration label
    precision: str  # language-model precision
    vision_precision: str  # vision-tower precision
    vision_size: int | None  # image side, pixels
    memory_bytes: int | None = None  # memory plotted: peak_memory_bytes if profiled, else estimated_bytes
    memory_kind: str | None = None  # "measured" or "estimated"
    peak_memory_bytes: int | None = None  # profile: peak during the requests, bytes
    idle_memory_bytes: int | None = None  # profile: after load, bytes
    memory_source: str | None = None  # profile: "nvml" or "rss"
    decode_tokens_per_s: float | None = None  # profile: decode speed, tokens/s
    ttft_s: float | None = None  # profile: time to first token, seconds
    vision_encode_s: float | None = None  # profile: vision encode, seconds
    load_s: float | None = None  # profile: load time, seconds
    memory_vs_baseline: float | None = None  # memory ÷ fp16 (measured ÷ measured, or estimate ÷ fp16 estimate)
    speed_vs_baseline: float | None = None  # profile: decode speed ÷ the fp16 baseline's
    baseline_source: str | None = None  # profile: "measured" or "estimated"
    baseline_peak_memory_bytes: int | None = None  # profile: the fp16 baseline's peak, bytes
    estimated_bytes: int | None = None  # estimator's total (the profile's when profiled), bytes
    reference: str | None = None  # eval: reference precision or server
    reference_label: str | None = None  # eval: the reference's label
    is_reference: bool | None = None  # eval: whether this is the reference
    kl_mean: float | None = None  # eval: mean per-token KL, nats
    kl_median: float | None = None  # eval: median per-token KL, nats
    kl_p99: float | None = None  # eval: 99th-percentile per-token KL, nats
    top1_agreement: float | None = None  # eval: share (0–1) of positions with the reference's argmax
    greedy_match: float | None = None  # eval: share (0–1) of items answered as the reference did
    delta_p_rms: float | None = None  # eval: RMS change of the reference token's probability
    accuracy: float | None = None  # eval: share (0–1) answered correctly
    accuracy_ci_low: float | None = None  # eval: 95% Wilson interval, low end
    accuracy_ci_high: float | None = None  # eval: 95% Wilson interval, high end
    accuracy_exact: float | None = None  # eval: exact-match share (0–1)
    accuracy_relaxed: float | None = None  # eval: whole-word-match share (0–1)
    accuracy_by_category: dict[str, float] | None = None  # eval: accuracy per item category
    n_items: int | None = None  # eval: items asked
    n_tokens: int | None = None  # eval: answer tokens compared
    task: str | None = None  # eval: task sets
    machine: dict | None = None  # where it ran (the eval row's, the profile's when profiled)


ROW_TYPES = {"profile": ProfileRow, "eval": EvalRow, "answers": AnswerRow, "report": ReportRow}
