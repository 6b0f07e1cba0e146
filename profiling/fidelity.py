"""Fidelity of a configuration to a reference, llama.cpp's KL-divergence method (``llama-perplexity
--kl-divergence``, PR #5076): teacher-force the reference's own answers through both and compare the next-token
distributions at every answer position.

Per token: KL(reference ‖ config) = Σ_v p_ref(v) · (log p_ref(v) − log p_cfg(v)); whether the two argmaxes agree
("same top p"); and Δp, the change in the probability of the reference's token. Reported: mean, median, p99 and max
KL; top-1 agreement; RMS Δp. Teacher forcing keeps every position comparable: free-running outputs diverge after
the first different token and the rest of the comparison would measure nothing.
"""

from __future__ import annotations

import torch

from .stats import mean, median, percentile


@torch.inference_mode()
def teacher_forced_logprobs(
    model, prompt_ids: list[int], pixels: torch.Tensor | None, answer_ids: list[int]
) -> torch.Tensor:
    """Log-probabilities (A, V), float32 on the CPU, of the positions that predict each of the A answer tokens."""
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)], device=model.embed_device)  # (1, S + A)
    px = None if pixels is None else (pixels[None] if pixels.dim() == 3 else pixels)
    # The last A+1 positions: the one before each answer token predicts it; the very last predicts past the end.
    logits = model(ids, pixel_values=px, logits_to_keep=len(answer_ids) + 1).logits[0, :-1]  # (A, V)
    return torch.log_softmax(logits.float(), dim=-1).cpu()


class FidelityStats:
    """Accumulates per-token comparisons over many items; :meth:`summary` gives the reported numbers."""

    def __init__(self):
        self.kl: list[float] = []
        self.top1: list[bool] = []
        self.delta_p: list[float] = []

    def add(self, ref_logprobs: torch.Tensor, logprobs: torch.Tensor, answer_ids: list[int]) -> torch.Tensor:
        """Compare (A, V) log-probs of one item; returns the (A,) per-token KL."""
        if ref_logprobs.shape != logprobs.shape:
            raise ValueError(
                f"log-prob shapes differ: reference {tuple(ref_logprobs.shape)}, config {tuple(logprobs.shape)}"
            )
        ref = ref_logprobs.double()
        cfg = logprobs.double()
        p = ref.exp()
        # p · (log p − log q), with 0 · anything = 0 (a −inf log q under p = 0 must not give NaN)
        kl = torch.where(p > 0, p * (ref - cfg), torch.zeros_like(p)).sum(-1).clamp_min(0.0)  # (A,)
        idx = torch.tensor(answer_ids).view(-1, 1)
        dp = (cfg.gather(1, idx).exp() - ref.gather(1, idx).exp()).view(-1)  # (A,)
        self.kl += kl.tolist()
        self.top1 += (ref.argmax(-1) == cfg.argmax(-1)).tolist()
        self.delta_p += dp.tolist()
        return kl

    def summary(self) -> dict:
        n = len(self.kl)
        return {
            "kl_mean": mean(self.kl),
            "kl_median": median(self.kl),
            "kl_p99": percentile(self.kl, 99),
            "kl_max": max(self.kl) if self.kl else None,
            "top1_agreement": sum(self.top1) / n if n else None,
            "delta_p_rms": (sum(d * d for d in self.delta_p) / n) ** 0.5 if n else None,
            "n_tokens": n,
        }
