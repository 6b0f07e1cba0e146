"""Numerical safety of sampling: every parameter value the API accepts gives a valid token and never raises, and a
row whose logits are not finite fails alone (a NumericalError for it, normal tokens for the others)."""

from __future__ import annotations

import math

import pytest
import torch

from glm4v import Message, SamplingParams, build_prompt
from glm4v.generate import generate_text
from glm4v.sampling import Sampler, sample_batch

V = 64
CPU = torch.device("cpu")


def _large_logits(rows: int = 3) -> torch.Tensor:
    """(rows, V + 6) logits with huge finite values in them; padding columns beyond V higher still."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, V + 6, generator=g) * 10
    x[:, 3], x[:, 9], x[:, 17], x[:, 20] = 3e38, -3e38, 1e30, -1e30
    x[:, V:] = 3.4e38
    return x


def _all_negative_logits(rows: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return -(torch.randn(rows, V, generator=g).abs() * 1e37) - 1


# (sampling parameters, prompt ids the repetition penalty sees, logits): each broke the old sampler.
EXTREMES = {
    "temperature=1e-300": (dict(temperature=1e-300), [], _large_logits),
    "temperature=5e-324": (dict(temperature=5e-324), [], _large_logits),
    "temperature=1e-6": (dict(temperature=1e-6), [], _large_logits),
    "temperature=0.5, huge logits": (dict(temperature=0.5), [], _large_logits),
    "top_k=5, temperature=0.3": (dict(temperature=0.3, top_k=5), [], _large_logits),
    "top_p=1e-300": (dict(top_p=1e-300), [], _large_logits),
    "top_p=5e-324": (dict(top_p=5e-324), [], _large_logits),
    "repetition_penalty=1e-300": (dict(repetition_penalty=1e-300), list(range(V)), _large_logits),
    "repetition_penalty=1e300, all seen, all negative": (
        dict(repetition_penalty=1e300),
        list(range(V)),
        _all_negative_logits,
    ),
    "presence/frequency=+2": (dict(temperature=0.5, presence_penalty=2, frequency_penalty=2), [], _large_logits),
    "presence/frequency=-2": (dict(temperature=0.5, presence_penalty=-2, frequency_penalty=-2), [], _large_logits),
}


@pytest.mark.parametrize("name", list(EXTREMES))
def test_extreme_but_valid_parameters_always_give_a_valid_token(name):
    kw, prompt_ids, make_logits = EXTREMES[name]
    logits = make_logits()
    samplers = [Sampler(SamplingParams(seed=s, **kw), V, CPU, prompt_ids) for s in range(logits.shape[0])]
    for _ in range(6):  # tokens get recorded, so the penalties bite from the second step on
        tokens = sample_batch(logits, samplers)
        assert all(0 <= t < V for t in tokens)


@pytest.mark.parametrize(
    "kw", [dict(temperature=1e-300), dict(temperature=5e-324), dict(temperature=1e-6), dict(top_p=0.0)]
)
def test_tiny_temperature_and_top_p_0_are_greedy(kw):
    assert SamplingParams(**kw).greedy
    s = Sampler(SamplingParams(**kw), V, CPU)
    assert s.generator is None
    logits = _large_logits()
    assert sample_batch(logits, [s] * 3) == logits[:, :V].argmax(-1).tolist()
    from glm4v.sampling import GREEDY_TEMPERATURE

    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy


@pytest.mark.parametrize("top_p", [1e-300, 5e-324])
def test_tiny_top_p_keeps_exactly_the_most_likely_token(top_p):
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(2))
    want = logits.argmax(-1).tolist()
    for seed in range(10):
        samplers = [Sampler(SamplingParams(temperature=2.0, top_p=top_p, seed=seed), V, CPU) for _ in range(4)]
        assert sample_batch(logits, samplers) == want


def test_repetition_penalty_is_clamped_where_applied():
    logits = torch.zeros(V)
    logits[1], logits[2] = 4.0, -4.0
    for rp, used in ((1e-300, 1e-2), (1e300, 1e2), (float("inf"), 1e2), (2.0, 2.0)):
        out = Sampler(SamplingParams(repetition_penalty=rp), V, CPU, prompt_ids=[1, 2]).process(logits)
        assert out[1] == pytest.approx(4.0 / used) and out[2] == pytest.approx(-4.0 * used)
    from glm4v.sampling import REPETITION_PENALTY_RANGE

    assert REPETITION_PENALTY_RANGE == (1e-2, 1e2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("mode", ["greedy", "mixed"])
def test_a_row_with_non_finite_logits_fails_alone(bad, mode):
    from glm4v.sampling import INVALID_TOKEN, NumericalError, sample_rows

    def samplers():
        if mode == "greedy":  # the batched-argmax fast path
            return [Sampler(SamplingParams(temperature=0), V, CPU) for _ in range(3)]
        return [
            Sampler(SamplingParams(temperature=1.0, seed=3), V, CPU),
            Sampler(SamplingParams(temperature=0.8, presence_penalty=1.0, seed=4), V, CPU),
            Sampler(SamplingParams(temperature=0, repetition_penalty=1.3), V, CPU, prompt_ids=[5]),
        ]

    logits = torch.randn(3, V + 6, generator=torch.Generator().manual_seed(5))
    logits[1, 7] = bad
    if math.isnan(bad):  # the whole row, as an fp16 overflow leaves it
        logits[1] = bad
    ss = samplers()
    tokens, errors = sample_rows(logits, ss)
    assert isinstance(errors[1], NumericalError) and "non-finite logits" in str(errors[1])
    assert tokens[1] == INVALID_TOKEN
    assert errors[0] is None and errors[2] is None
    alone = samplers()  # same seeds: the other rows get exactly the tokens they get without the bad row
    assert [tokens[0], tokens[2]] == [sample_batch(logits[i : i + 1], [alone[i]])[0] for i in (0, 2)]
    if ss[1].output_counts is not None:
        assert ss[1].output_counts.sum() == 0  # the failed row's token was not recorded
    with pytest.raises(NumericalError):
        sample_batch(logits, samplers())


def test_a_sampler_that_raises_fails_its_row_alone():
    from glm4v.sampling import sample_rows

    ss = [Sampler(SamplingParams(temperature=1.0, seed=i), V, CPU) for i in range(3)]

    def broken(logits):
        raise RuntimeError("grammar exploded")

    ss[0].choose = broken
    logits = torch.randn(3, V)
    tokens, errors = sample_rows(logits, ss)
    assert "grammar exploded" in str(errors[0]) and errors[1] is None and errors[2] is None
    assert all(0 <= t < V for t in tokens[1:])


def test_an_invalid_distribution_falls_back_to_the_argmax_before_multinomial():
    from glm4v.sampling import _valid_or_argmax

    logits = torch.tensor([0.0, 5.0, 1.0, -2.0])
    for probs in (
        torch.full((4,), float("nan")),
        torch.zeros(4),
        torch.tensor([0.5, float("inf"), 0.0, 0.0]),
        torch.tensor([0.5, 0.7, -0.2, 0.0]),
    ):
        assert _valid_or_argmax(probs, logits).tolist() == [0.0, 1.0, 0.0, 0.0]
    ok = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert torch.equal(_valid_or_argmax(ok, logits), ok)


def test_generate_uses_the_safe_path(tiny_fp32):
    lm = tiny_fp32
    ids = build_prompt(lm.tokenizer, [Message("user", "hello there")]).ids
    greedy = generate_text(
        lm.model, lm.tokenizer, ids, None, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    )[1]
    for kw in (dict(temperature=5e-324), dict(top_p=1e-300, seed=1), dict(top_p=0.0)):
        got = generate_text(lm.model, lm.tokenizer, ids, None, SamplingParams(max_new_tokens=6, ignore_eos=True, **kw))
        assert got[1] == greedy and got[2] == "length"
