"""Sampling math, seeds, stop conditions and the plain decode loop."""

from __future__ import annotations

import pytest
import torch

from glm4v import Message, SamplingParams, build_prompt
from glm4v.generate import generate, generate_text
from glm4v.sampling import Sampler, sample_batch

V = 50


def _sampler(**kw):
    return Sampler(SamplingParams(**kw), V, torch.device("cpu"))


def test_parameter_validation():
    nan = float("nan")
    for bad in (
        dict(temperature=-1),
        dict(temperature=nan),
        dict(top_p=-0.1),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(max_new_tokens=0),
        dict(repetition_penalty=0),
        dict(repetition_penalty=nan),
        dict(presence_penalty=3),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_greedy_top_k_1_and_tiny_top_p_pick_the_argmax():
    logits = torch.randn(3, V + 14)  # with padding rows beyond the vocabulary
    logits[:, V:] = 100.0  # padding rows must never win
    want = logits[:, :V].argmax(-1).tolist()
    assert sample_batch(logits, [_sampler(temperature=0)] * 3) == want
    assert sample_batch(logits, [_sampler(temperature=1.0, top_k=1, seed=s) for s in range(3)]) == want
    assert sample_batch(logits, [_sampler(temperature=1.0, top_p=1e-6, seed=s) for s in range(3)]) == want


def test_seed_makes_sampling_repeatable():
    logits = torch.randn(1, V)
    a = [sample_batch(logits, [s])[0] for s in [_sampler(temperature=1.0, seed=5)] * 1 for _ in range(20)]
    b = [sample_batch(logits, [s])[0] for s in [_sampler(temperature=1.0, seed=5)] * 1 for _ in range(20)]
    c = [sample_batch(logits, [s])[0] for s in [_sampler(temperature=1.0, seed=6)] * 1 for _ in range(20)]
    assert a == b and a != c


def test_top_k_restricts_the_support():
    logits = torch.arange(V, dtype=torch.float32)[None]
    s = _sampler(temperature=5.0, top_k=3, seed=0)
    picks = {sample_batch(logits, [s])[0] for _ in range(200)}
    assert picks <= {V - 1, V - 2, V - 3} and len(picks) > 1


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4))
    logits = torch.log(probs.clamp_min(1e-12))[None]
    s = _sampler(temperature=1.0, top_p=0.8, seed=0)
    picks = {sample_batch(logits, [s])[0] for _ in range(300)}
    assert picks == {0, 1}


def test_repetition_presence_and_frequency_penalties():
    s = Sampler(SamplingParams(repetition_penalty=2.0), V, torch.device("cpu"), prompt_ids=[1, 2])
    logits = torch.zeros(V)
    logits[1], logits[2], logits[3] = 4.0, -4.0, 4.0
    out = s.process(logits)
    assert out[1] == 2.0 and out[2] == -8.0 and out[3] == 4.0  # CTRL rule on seen tokens only
    s = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), V, torch.device("cpu"), prompt_ids=[7])
    for t in (3, 3, 4):
        s.record(t)
    out = s.process(torch.zeros(V))
    assert out[3] == pytest.approx(-1.0) and out[4] == pytest.approx(-0.75) and out[7] == 0.0  # outputs only


@pytest.fixture(scope="module")
def prompt(tiny_fp32):
    return build_prompt(tiny_fp32.tokenizer, [Message("user", "Describe the picture.", has_image=True)]).ids


def test_generate_greedy_matches_argmax_of_full_forward(tiny_fp32, prompt, red_image):
    px = tiny_fp32.image_processor(red_image)
    text, toks, reason = generate_text(
        tiny_fp32.model,
        tiny_fp32.tokenizer,
        prompt,
        px,
        SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True),
    )
    seq = list(prompt)
    with torch.no_grad():
        for t in toks:
            logits = tiny_fp32.model(torch.tensor([seq]), pixel_values=px[None]).logits[0, -1]
            assert int(logits[: tiny_fp32.tokenizer.vocab_size].argmax()) == t
            seq.append(t)
    assert reason == "length" and len(toks) == 5
    assert text == tiny_fp32.tokenizer.decode(toks)


def test_generate_yields_tokens_one_by_one_and_stops_on_eos(tiny_fp32, prompt, red_image):
    px = tiny_fp32.image_processor(red_image)
    free = [
        s.token_id
        for s in generate(
            tiny_fp32.model,
            tiny_fp32.tokenizer,
            prompt,
            px,
            SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True),
        )
    ]
    steps = list(
        generate(
            tiny_fp32.model,
            tiny_fp32.tokenizer,
            prompt,
            px,
            SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[free[2]]),
        )
    )
    assert [s.token_id for s in steps] == free[: free.index(free[2]) + 1]
    assert [s.finish_reason for s in steps] == [None] * (len(steps) - 1) + ["stop"]


def test_generate_stop_string_is_excluded(tiny_fp32, prompt, red_image):
    px = tiny_fp32.image_processor(red_image)
    p = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    full, _, _ = generate_text(tiny_fp32.model, tiny_fp32.tokenizer, prompt, px, p)
    stop = full[3:5]
    p.stop = [stop]
    cut, _, reason = generate_text(tiny_fp32.model, tiny_fp32.tokenizer, prompt, px, p)
    assert reason == "stop" and cut == full[: full.index(stop)]


def test_generate_ends_with_length_when_the_cache_is_full(tiny_fp32, prompt, red_image):
    px = tiny_fp32.image_processor(red_image)
    room = len(prompt) - 3 + tiny_fp32.image_tokens()
    steps = list(
        generate(
            tiny_fp32.model,
            tiny_fp32.tokenizer,
            prompt,
            px,
            SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True),
            max_len=room + 4,
        )
    )
    assert steps[-1].finish_reason == "length" and len(steps) == 5
