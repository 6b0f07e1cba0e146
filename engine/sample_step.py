"""One step's sampling for a batch of sequences: grammar masks, the sampler, logprobs — each row's problem alone.

Log-probs come from the raw logits (the model's distribution); then each constrained row gets its grammar's mask
(computed on the host while a GPU is still busy with the forward the engine launched), applied to those rows only;
rows without a grammar or logprobs pay nothing extra. A matcher that fails fails its row alone, as a sampler does.
"""

from __future__ import annotations

import torch

from glm4v.sampling import log_probs, sample_rows, token_logprobs

from .sequence import Sequence
from .structured import apply_bitmask, new_bitmask


def sample_step(seqs: list[Sequence], logits: torch.Tensor, vocab_size: int) -> tuple[list, list, list]:
    """(B, V') logits, row i for ``seqs[i]`` → per row: token, error (or None), logprob entry (or None)."""
    errors: list[Exception | None] = [None] * len(seqs)
    want_lp = [i for i, s in enumerate(seqs) if s.sampler.params.logprobs is not None]
    lp = log_probs(logits, want_lp, vocab_size) if want_lp else None
    constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
    if constrained:
        bitmask = new_bitmask(len(constrained), vocab_size)
        for j, i in enumerate(constrained):
            try:
                seqs[i].matcher.fill_bitmask(bitmask, j)
            except Exception as e:
                errors[i] = e
        apply_bitmask(logits, bitmask, constrained)
    tokens, sample_errors = sample_rows(logits, [s.sampler for s in seqs])
    errors = [e or se for e, se in zip(errors, sample_errors, strict=True)]
    entries: list = [None] * len(seqs)
    ok = [i for i in want_lp if errors[i] is None]
    if ok:
        rows = [want_lp.index(i) for i in ok]
        got = token_logprobs(lp[rows], [tokens[i] for i in ok], [seqs[i].sampler.params.logprobs for i in ok])
        for i, entry in zip(ok, got, strict=True):
            entries[i] = entry
    return tokens, errors, entries
