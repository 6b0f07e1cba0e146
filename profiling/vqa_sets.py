"""Visual-QA items, user JSONL sets, and answer scoring (exact, normalized, relaxed) with a confidence interval.

A user set is a JSON-lines file, one item per line::

    {"image": "images/receipt.jpg", "question": "What is the total?", "answers": ["12.50", "$12.50"]}

``image`` is a path relative to the JSONL file (or absolute); ``answers`` a string or a list of accepted answers;
``id`` and ``category`` are optional. Errors name the file and line.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .stats import wilson_interval


@dataclass
class Item:
    id: str
    question: str
    answers: list[str]
    image: Path | Callable[[], Image.Image]  # a file, or a function drawing the image (synthetic items)
    category: str = "user"
    meta: dict = field(default_factory=dict)

    def prompt(self, suffix: str) -> str:
        """The question as sent: with the answerer's ``suffix`` unless the item carries its own (``prompt_suffix``)."""
        return self.question + self.meta.get("prompt_suffix", suffix)

    def open_image(self) -> Image.Image:
        if isinstance(self.image, Path):
            with Image.open(self.image) as im:
                return im.convert("RGB")
        return self.image()

    def png_bytes(self) -> bytes:
        """The image as PNG bytes: exactly what is sent to a server in ``--base-url`` mode."""
        buf = io.BytesIO()
        self.open_image().save(buf, format="PNG")
        return buf.getvalue()


def load_jsonl_set(path: str | Path) -> list[Item]:
    from .results_io import iter_jsonl

    path = Path(path)
    items = []
    for lineno, d in iter_jsonl(path, what="task set"):
        where = f"{path}:{lineno}"
        missing = [k for k in ("image", "question", "answers") if k not in d]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
        answers = [d["answers"]] if isinstance(d["answers"], str) else d["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: 'answers' must be a string or a non-empty list of strings")
        image = Path(d["image"])
        if not image.is_absolute():
            image = path.parent / image
        if not image.is_file():
            raise ValueError(f"{where}: image {d['image']!r} not found (looked for {image})")
        items.append(
            Item(
                str(d.get("id", f"{path.stem}-{lineno}")),
                str(d["question"]),
                answers,
                image,
                str(d.get("category", path.stem)),
            )
        )
    if not items:
        raise ValueError(f"task set {path} holds no items")
    return items


def write_jsonl_set(items: list[Item], out_dir: str | Path, name: str = "set.jsonl") -> Path:
    """Save items (images as PNG files) as a user set: to inspect the synthetic set or feed it to another tool."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / name, "w", encoding="utf-8") as f:
        for it in items:
            rel = Path("images") / f"{it.id}.png"
            it.open_image().save(out / rel)
            f.write(
                json.dumps(
                    {
                        "id": it.id,
                        "image": str(rel),
                        "question": it.question,
                        "answers": it.answers,
                        "category": it.category,
                    }
                )
                + "\n"
            )
    return out / name


# ---- scoring ------------------------------------------------------------------------------------------------
NUMBER_WORDS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
}
ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> str:
    """Lowercase, number words → digits, thousands separators and punctuation dropped, articles dropped."""
    t = text.strip().lower()
    t = re.sub(r"(?<=\d)[,\s](?=\d{3}\b)", "", t)  # "4,821" / "4 821" → "4821"
    t = re.sub(r"[^\w\s]", " ", t)
    words = [NUMBER_WORDS.get(w, w) for w in t.split() if w not in ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, answers: list[str]) -> bool:
    return prediction.strip() in {a.strip() for a in answers}


def normalized_match(prediction: str, answers: list[str]) -> bool:
    p = normalize(prediction)
    return any(p == normalize(a) for a in answers)


def relaxed_match(prediction: str, answers: list[str]) -> bool:
    """An accepted answer appears as whole words in the prediction ("The circle is red." ⊇ "red"); lenient, like
    OCRBench's substring rule, so it is reported beside the strict score, never instead of it."""
    p = f" {normalize(prediction)} "
    return any(f" {normalize(a)} " in p for a in answers if normalize(a))


def score(predictions: list[str], items: list[Item]) -> dict:
    """Accuracy (normalized match) with a 95% Wilson interval, plus exact/relaxed rates and per-category scores."""
    n = len(items)
    norm = [normalized_match(p, it.answers) for p, it in zip(predictions, items, strict=True)]
    k = sum(norm)
    low, high = wilson_interval(k, n)
    by_cat: dict[str, list[bool]] = {}
    for ok, it in zip(norm, items, strict=True):
        by_cat.setdefault(it.category, []).append(ok)
    return {
        "accuracy": k / n if n else None,
        "accuracy_ci_low": low,
        "accuracy_ci_high": high,
        "accuracy_exact": sum(exact_match(p, it.answers) for p, it in zip(predictions, items, strict=True)) / n
        if n
        else None,
        "accuracy_relaxed": sum(relaxed_match(p, it.answers) for p, it in zip(predictions, items, strict=True)) / n
        if n
        else None,
        "accuracy_by_category": {c: sum(v) / len(v) for c, v in by_cat.items()},
        "n_items": n,
        "n_correct": k,
    }
