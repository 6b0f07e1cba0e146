"""Sampling parameters and next-token selection, per sequence, batch-friendly.

Penalties follow vLLM's conventions: ``repetition_penalty`` (HF/CTRL style: divide positive logits, multiply
negative ones) applies to prompt and output tokens; OpenAI's ``presence_penalty`` / ``frequency_penalty`` apply to
output tokens only. ``temperature == 0`` means greedy (as does ``top_k == 1`` or ``top_p == 0``). A ``seed`` gives
the sequence its own generator, so a seeded request samples the same tokens whatever else shares the batch.

Numerical safety — every value :class:`SamplingParams` accepts gives a valid token, never an exception:

* ``temperature`` below :data:`GREEDY_TEMPERATURE` (1e-4) is greedy too: dividing by 1e-300 or 5e-324 (0 in
  float32) would make every logit inf.
* top-p always keeps the most likely token, so a ``top_p`` that rounds to 0 in float32 (1e-300) keeps exactly it.
* ``repetition_penalty`` is clamped to :data:`REPETITION_PENALTY_RANGE` ([0.01, 100]) where it is applied.
* Tempered logits that overflow are clamped to float32's finite range before the softmax, and a distribution that
  is still not one ``torch.multinomial`` accepts falls back to the argmax *before* multinomial sees it — on CUDA an
  invalid distribution is a device-side assert that takes down the whole process's CUDA context.

Failures stay per row: :func:`sample_rows` reports, for each row, a token or an error — the row's sampler raising,
or :class:`NumericalError` when the model's own logits for that row are not finite (fp16 overflow) — with the
finite flags folded into the one device→host transfer of the tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

# Below this, sampling is argmax in all but name: at τ = 1e-4 a logit gap of 0.01 (about bf16's resolution around
# 1–10) is a probability ratio of e^100. Far below it the division overflows float32, so it is greedy outright.
GREEDY_TEMPERATURE = 1e-4
# Where repetition_penalty is applied it is clamped to this range: 100 already all but bans a seen token (or
# insists on it), and beyond it ordinary logits overflow to inf or underflow to 0. The API accepts any value > 0.
REPETITION_PENALTY_RANGE = (1e-2, 1e2)
INVALID_TOKEN = -1  # sample_rows' token for a row that failed
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs

_F32 = torch.finfo(torch.float32)


class NumericalError(RuntimeError):
    """The model's logits for a sequence were not finite (NaN/inf, e.g. fp16 overflow): no token can be chosen."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the model's eos ids
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; k = the sampled token's logprob and the k most likely (0 … 20)

    def __post_init__(self):
        # Written as `not (x in range)` so NaN is refused too.
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if not self.temperature >= 0:
            raise ValueError("temperature must be >= 0")
        if not 0 <= self.top_p <= 1:
            raise ValueError("top_p must be in [0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not self.repetition_penalty > 0:
            raise ValueError("repetition_penalty must be > 0")
        if not -2 <= self.presence_penalty <= 2 or not -2 <= self.frequency_penalty <= 2:
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1 or self.top_p == 0


class Sampler:
    """The per-sequence state of sampling: its generator and the token counts penalties need.

    ``vocab_size`` is the tokenizer's: the padding rows of the embedding matrix (151343…151551 in GLM-4V) are never
    sampled, whatever the logits say.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device, prompt_ids: list[int] = ()):
        self.params = params
        self.device = device
        self.vocab_size = vocab_size
        needs_counts = params.presence_penalty or params.frequency_penalty
        self.output_counts = torch.zeros(vocab_size, device=device) if needs_counts else None
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if prompt_ids:
                ids = torch.tensor([i for i in prompt_ids if i < vocab_size], device=device, dtype=torch.long)
                self.seen[ids] = True
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            self.generator.manual_seed(seed)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no penalties: the batch's argmax is this row's token."""
        return self.params.greedy and self.seen is None and self.output_counts is None

    def record(self, token_id: int) -> None:
        if token_id >= self.vocab_size:
            return
        if self.output_counts is not None:
            self.output_counts[token_id] += 1
        if self.seen is not None:
            self.seen[token_id] = True

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) raw logits → (V,) float32 logits after penalties (may hold ±inf when huge logits meet them)."""
        p = self.params
        logits = logits.float()
        if self.seen is not None:
            lo, hi = REPETITION_PENALTY_RANGE
            rp = min(max(p.repetition_penalty, lo), hi)
            penalised = torch.where(logits > 0, logits / rp, logits * rp)
            logits = torch.where(self.seen, penalised, logits)
        if self.output_counts is not None:
            logits = logits - p.frequency_penalty * self.output_counts - p.presence_penalty * (self.output_counts > 0)
        return logits

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) processed logits → 0-d token tensor (no host sync here)."""
        p = self.params
        if p.greedy:
            return logits.argmax()
        # Identity on finite logits; an overflow (huge logit / small τ, or a penalty) becomes float32's max, so the
        # softmax below always has a finite maximum and sums to ≥ 1.
        logits = torch.nan_to_num(logits / p.temperature, nan=_F32.min, posinf=_F32.max, neginf=_F32.min)
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cum = sorted_probs.cumsum(-1)
            drop = (cum - sorted_probs) >= p.top_p  # keep the smallest prefix reaching top_p
            drop[0] = False  # ... and always the top token: a top_p that is 0 in float32 (1e-300) keeps just it
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return torch.multinomial(_valid_or_argmax(probs, logits), 1, generator=self.generator)[0]


def _valid_or_argmax(probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(V,) probs unchanged if multinomial accepts them (finite, ≥ 0, sum > 0), else one-hot at argmax(logits).

    Decided on the device (torch.where), so it costs no host sync and leaves valid rows — and the generator's
    draws — exactly as they were.
    """
    ok = torch.isfinite(probs).all() & (probs >= 0).all() & (probs.sum() > 0)
    fallback = torch.zeros_like(probs).scatter_(-1, logits.argmax()[None], 1.0)
    return torch.where(ok, probs, fallback)


def _sample_on_device(logits: torch.Tensor, samplers: list[Sampler], errors: list) -> torch.Tensor:
    """(B, V) logits → (B,) tokens, INVALID_TOKEN where the raw logits are not finite or the row's sampler raised
    (its exception goes into ``errors``)."""
    logits = logits[:, : samplers[0].vocab_size]  # drop the padding rows of the LM head
    finite = torch.isfinite(logits).all(dim=-1)  # (B,) folded into the tokens: no host sync of its own
    if all(s.plain_greedy for s in samplers):
        chosen = logits.argmax(dim=-1)  # (B,)
    else:
        picks = []
        for i, s in enumerate(samplers):
            try:
                picks.append(s.choose(s.process(logits[i])))
            except Exception as e:
                errors[i] = e
                picks.append(logits.new_full((), INVALID_TOKEN, dtype=torch.long))  # a fill, not a host copy
        chosen = torch.stack(picks)  # (B,)
    return torch.where(finite, chosen, INVALID_TOKEN)


def sample_rows(logits: torch.Tensor, samplers: list[Sampler]) -> tuple[list[int], list[Exception | None]]:
    """(B, V) logits, one sampler per row → B token ids and B errors (None where the row went well).

    A row fails alone: its sampler raising, or its raw logits not being finite (:class:`NumericalError`); its token
    is :data:`INVALID_TOKEN` and is not recorded. Only a failure of the shared part (the batched argmax, the one
    device→host transfer) is every row's. Never raises.
    """
    errors: list[Exception | None] = [None] * len(samplers)
    try:
        tokens = _sample_on_device(logits, samplers, errors).tolist()
    except Exception as e:
        return [INVALID_TOKEN] * len(samplers), [e] * len(samplers)
    for i, (s, t) in enumerate(zip(samplers, tokens, strict=True)):
        if errors[i] is None and t == INVALID_TOKEN:
            errors[i] = NumericalError("the model produced non-finite logits for this sequence (numerical overflow)")
        if errors[i] is None:
            try:
                s.record(t)
            except Exception as e:
                errors[i] = e
    return tokens, errors


def sample_batch(logits: torch.Tensor, samplers: list[Sampler]) -> list[int]:
    """(B, V) logits, one sampler per row → B token ids; raises the first failed row's error (see sample_rows)."""
    tokens, errors = sample_rows(logits, samplers)
    for e in errors:
        if e is not None:
            raise e
    return tokens


@dataclass
class TokenLogprob:
    """The model's log-probability of a chosen token and of the ``k`` most likely ones at that step."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token, logprob), most likely first


def log_probs(logits: torch.Tensor, rows: list[int], vocab_size: int) -> torch.Tensor:
    """(B, V') raw logits → (len(rows), vocab_size) float32 log-softmax of those rows: the model's own distribution
    over the tokenizer's vocabulary, before temperature, penalties or a grammar mask (vLLM's ``raw_logprobs``)."""
    return torch.log_softmax(logits[rows, :vocab_size].float(), dim=-1)


def token_logprobs(logprobs: torch.Tensor, tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
    """(R, V) log-probs (:func:`log_probs`), the token chosen in each row and how many alternatives each row wants
    → one :class:`TokenLogprob` per row; top lists sorted, most likely first."""
    idx = torch.tensor(tokens, device=logprobs.device).clamp(min=0)[:, None]
    chosen = logprobs.gather(1, idx)[:, 0].tolist()
    k = max(ks, default=0)
    top_v, top_i = ([], []) if k == 0 else (t.tolist() for t in torch.topk(logprobs, k, dim=-1, sorted=True))
    return [
        TokenLogprob(tok, lp, list(zip(top_i[r][: ks[r]], top_v[r][: ks[r]], strict=True)) if k else [])
        for r, (tok, lp) in enumerate(zip(tokens, chosen, strict=True))
    ]
