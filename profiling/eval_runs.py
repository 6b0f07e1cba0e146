"""The two eval loops: local precisions against a local reference (fidelity + accuracy), and OpenAI-compatible
servers over HTTP (accuracy + greedy-output match against the first server).

Local: the reference configuration runs first; its greedy answers and their teacher-forced log-probs are kept
(float32 on the host: answer tokens × vocabulary, ~0.6 MB per token for the real 151,552 vocabulary) and the
reference is unloaded before the next configuration loads, so only one model is ever resident.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

from .fidelity import FidelityStats
from .matrix import ConfigKey
from .rows import AnswerRow, EvalRow
from .vqa_sets import Item, normalized_match, score

HTTP_NOTE = (
    "--base-url: an OpenAI chat-completions response carries no full next-token distribution, so KL "
    "divergence and top-1 agreement are not computed over HTTP (use --model for them); greedy match "
    "compares each server's answers with the first URL's"
)


@dataclass
class Answers:
    texts: list[str]
    ids: list[list[int]] | None = None
    logprobs: list | None = None  # per item (A, V) tensors, reference only


def _free(lm) -> None:
    import torch

    device = lm.device
    del lm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _load(model_dir: str, key: ConfigKey, opts: dict, reference: bool = False):
    """The model of one configuration; ``--offload`` / ``--lm-head-precision`` apply to the compared ones, never
    to the reference (it is the quality yardstick)."""
    from quant.offload import parse_offload
    from quant.request import LoadRequest, open_model

    opts = dict(opts)
    offload, head = parse_offload(opts.pop("offload", None)), opts.pop("lm_head_precision", None)
    return open_model(
        LoadRequest(
            model=model_dir,
            precision=key.precision,
            vision_precision=key.vision_precision,
            vision_size=key.vision_size,
            offload=() if reference else offload,
            lm_head_precision=None if reference else head,
            **opts,
        )
    )


def _base_row(key: ConfigKey, lm, config, max_new_tokens: int, n_prompt: int) -> dict:
    from quant.estimate import estimate

    est = estimate(
        config,
        precision=lm.spec.precision,
        vision_precision=lm.spec.vision_precision,
        vision_size=lm.vision_size,
        context=n_prompt + max_new_tokens,
        device=lm.device.type,
        prompt_tokens=n_prompt,
        lm_head_precision=lm.spec.lm_head_precision,
        offload=lm.offload,
    )
    head = lm.spec.label().partition("+head-")[2]  # --lm-head-precision shows in the label: its cost is the point
    return {
        "label": key.label() + (f"+head-{head}" if head else "") + ("+offload" if lm.offload else ""),
        "precision": lm.spec.precision,
        "vision_precision": lm.spec.vision_precision,
        "vision_size": lm.vision_size,
        "device": str(lm.device),
        "load_s": lm.load_s,
        "weight_bytes": lm.weight_bytes["total"],
        "estimated_bytes": est.total_bytes,
    }


def _answer_rows(label: str, items: list[Item], texts: list[str]) -> list[AnswerRow]:
    return [
        AnswerRow(
            config=label,
            id=it.id,
            category=it.category,
            question=it.question,
            answers=it.answers,
            prediction=t,
            correct=normalized_match(t, it.answers),
        )
        for it, t in zip(items, texts, strict=True)
    ]


def evaluate_local(
    model_dir: str,
    config,
    keys: list[ConfigKey],
    ref_key: ConfigKey,
    items: list[Item],
    opts: dict,
    max_new_tokens: int,
    bar,
) -> tuple[list[EvalRow], list[AnswerRow]]:
    """Rows (reference first) and per-item answers for each configuration."""
    from glm4v import expanded_length

    from .answerers import LocalAnswerer

    rows, answers = [], []
    ref_lm = _load(model_dir, ref_key, opts, reference=True)
    ref = LocalAnswerer(ref_lm, max_new_tokens)
    t0 = time.perf_counter()
    ref_out = Answers([], [], [])
    n_prompt = 0
    for it in items:
        text, ids, prepared = ref.answer(it)
        ref_out.texts.append(text)
        ref_out.ids.append(ids)
        ref_out.logprobs.append(ref.logprobs(prepared, ids))
        n_prompt = max(n_prompt, expanded_length(len(prepared[0]), ref_lm.image_tokens()))
        bar.update(note=f"{ref_key.label()} (reference)")
    ref_row = _base_row(ref_key, ref_lm, config, max_new_tokens, n_prompt)
    ref_row.update(
        is_reference=True,
        reference=ref_key.precision,
        reference_label=ref_key.label(),
        kl_mean=0.0,
        kl_median=0.0,
        kl_p99=0.0,
        kl_max=0.0,
        top1_agreement=1.0,
        delta_p_rms=0.0,
        greedy_match=1.0,
        n_tokens=sum(len(i) for i in ref_out.ids),
        eval_s=time.perf_counter() - t0,
        **score(ref_out.texts, items),
    )
    rows.append(EvalRow.from_dict(ref_row))
    answers += _answer_rows(ref_key.label(), items, ref_out.texts)
    _free(ref_lm)
    del ref

    for key in keys:
        if key == ref_key:
            continue
        lm = _load(model_dir, key, opts)
        a = LocalAnswerer(lm, max_new_tokens)
        t0 = time.perf_counter()
        stats, texts, same = FidelityStats(), [], 0
        for i, it in enumerate(items):
            text, _, prepared = a.answer(it)
            texts.append(text)
            same += text == ref_out.texts[i]
            stats.add(ref_out.logprobs[i], a.logprobs(prepared, ref_out.ids[i]), ref_out.ids[i])
            bar.update(note=key.label())
        row = _base_row(key, lm, config, max_new_tokens, n_prompt)
        row.update(
            is_reference=False,
            reference=ref_key.precision,
            reference_label=ref_key.label(),
            **stats.summary(),
            greedy_match=same / len(items),
            eval_s=time.perf_counter() - t0,
            **score(texts, items),
        )
        rows.append(EvalRow.from_dict(row))
        answers += _answer_rows(row["label"], items, texts)  # the row's label: +head-…/+offload included
        del a
        _free(lm)
    return rows, answers


def evaluate_http(
    urls: list[str], items: list[Item], served_model: str | None, max_new_tokens: int, timeout_s: float, bar
) -> tuple[list[EvalRow], list[AnswerRow]]:
    """One row per server; the first URL is the reference for the greedy-output match."""
    from .answerers import HttpAnswerer

    rows, answers, ref_texts, ref_label = [], [], None, None
    for n, url in enumerate(urls):
        client = HttpAnswerer(url, served_model, max_new_tokens, timeout_s)
        info = client.describe()
        label = f"{info['served_model'] or 'server'} @ {url}"
        t0 = time.perf_counter()
        texts = []
        try:
            for it in items:
                texts.append(client.answer(it))
                bar.update(note=label)
        finally:
            client.close()
        if ref_texts is None:
            ref_texts, ref_label = texts, label
        row = EvalRow.from_dict(
            {
                "label": label,
                **info,
                "is_reference": n == 0,
                "reference": ref_label,
                "reference_label": ref_label,
                "kl_mean": None,
                "kl_median": None,
                "kl_p99": None,
                "kl_max": None,
                "top1_agreement": None,
                "delta_p_rms": None,
                "n_tokens": None,
                "greedy_match": sum(a == b for a, b in zip(texts, ref_texts, strict=True)) / len(items),
                "eval_s": time.perf_counter() - t0,
                "note": HTTP_NOTE,
                **score(texts, items),
            }
        )
        rows.append(row)
        answers += _answer_rows(label, items, texts)
    return rows, answers
