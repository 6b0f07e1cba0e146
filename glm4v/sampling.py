"""Sampling parameters and next-token selection, per sequence, batch-friendly.

Penalties follow vLLM's conventions: ``repetition_penalty`` (HF/CTRL style: divide positive logits, multiply
negative ones) applies to prompt and output tokens; OpenAI's ``presence_penalty`` / ``frequency_penalty`` apply to
output tokens only. ``temperature == 0`` means greedy. A ``seed`` gives the sequence its own generator, so a
seeded request samples the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the model's eos ids
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if not -2 <= self.presence_penalty <= 2 or not -2 <= self.frequency_penalty <= 2:
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


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

    def record(self, token_id: int) -> None:
        if token_id >= self.vocab_size:
            return
        if self.output_counts is not None:
            self.output_counts[token_id] += 1
        if self.seen is not None:
            self.seen[token_id] = True

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) raw logits → (V,) float32 logits after penalties and temperature."""
        p = self.params
        logits = logits.float()
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.output_counts is not None:
            logits = logits - p.frequency_penalty * self.output_counts - p.presence_penalty * (self.output_counts > 0)
        return logits

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) processed logits → 0-d token tensor (no host sync here)."""
        p = self.params
        if p.greedy:
            return logits.argmax()
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cum = sorted_probs.cumsum(-1)
            drop = (cum - sorted_probs) >= p.top_p  # keep the smallest prefix reaching top_p (always ≥ 1 token)
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=self.generator)[0]


def sample_batch(logits: torch.Tensor, samplers: list[Sampler]) -> list[int]:
    """(B, V) logits, one sampler per row → B token ids, with a single device→host transfer."""
    logits = logits[:, : samplers[0].vocab_size]  # drop the padding rows of the LM head
    if all(s.params.greedy and s.seen is None and s.output_counts is None for s in samplers):
        tokens = logits.argmax(dim=-1).tolist()
    else:
        tokens = torch.stack([s.choose(s.process(logits[i])) for i, s in enumerate(samplers)]).tolist()
    for s, t in zip(samplers, tokens):
        s.record(t)
    return tokens
