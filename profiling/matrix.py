"""The experiment grid: precision × vision precision × vision size, from comma lists on the command line.

Shared by ``profile``, ``eval`` and ``report`` so that a configuration has one key and one label everywhere,
and the report can join rows of different tools on it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from quant import PRECISIONS

SAME = "same"  # --vision-precision entry meaning "as --precision"


def comma_list(text, kind=str, strict: bool = False) -> list:
    """``"1, 4,8"`` → [1, 4, 8]: the one parser for every comma-list flag. Empty entries are dropped, or with
    ``strict`` refused (ValueError); ``kind`` raises ValueError on a bad entry."""
    items = [x.strip() for x in str(text).split(",")]
    if strict and (not str(text).strip() or any(not x for x in items)):
        raise ValueError(f"list {text!r} has an empty entry")
    return [kind(x) for x in items if x]


def _items(text: str, what: str) -> list[str]:
    try:
        return comma_list(text, strict=True)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} list {text!r} has an empty entry (use e.g. bf16,int8,nf4)") from None


def precision_list(text: str) -> list[str]:
    """argparse type: ``bf16,int8,nf4`` → ["bf16", "int8", "nf4"]; names the bad entry otherwise."""
    items = _items(text, "precision")
    bad = [x for x in items if x not in PRECISIONS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown precision {', '.join(map(repr, bad))} in {text!r}; choose from {', '.join(PRECISIONS)}"
        )
    return list(dict.fromkeys(items))


def vision_precision_list(text: str) -> list[str | None]:
    items = _items(text, "vision precision")
    bad = [x for x in items if x not in PRECISIONS and x != SAME]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown vision precision {', '.join(map(repr, bad))} in {text!r}; "
            f"choose from {SAME}, {', '.join(PRECISIONS)}"
        )
    return list(dict.fromkeys(None if x == SAME else x for x in items))


def size_list(text: str) -> list[int]:
    """argparse type: ``1120,560,448`` → [1120, 560, 448]; each a positive multiple of 28."""
    out = []
    for x in _items(text, "vision size"):
        try:
            n = int(x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"vision size {x!r} in {text!r} is not an integer") from None
        if n <= 0 or n % 28:
            raise argparse.ArgumentTypeError(f"vision size {n} in {text!r} must be a positive multiple of 28")
        out.append(n)
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class ConfigKey:
    """One configuration. ``vision_size`` None = the checkpoint's trained size (resolved when loading)."""

    precision: str
    vision_precision: str
    vision_size: int | None = None

    def label(self) -> str:
        return label(self.precision, self.vision_precision, self.vision_size)

    def resolved(self, trained_size: int) -> "ConfigKey":
        return ConfigKey(self.precision, self.vision_precision, self.vision_size or trained_size)


def label(precision: str, vision_precision: str | None, vision_size: int | None = None) -> str:
    """``nf4``, ``nf4+vision-bf16``, with ``@448`` when a vision size is given."""
    vp = vision_precision or precision
    base = precision if vp == precision else f"{precision}+vision-{vp}"
    return f"{base}@{vision_size}" if vision_size else base


def grid(
    precisions: list[str], vision_precisions: list[str | None] | None = None, vision_sizes: list[int] | None = None
) -> list[ConfigKey]:
    """Cartesian product in the order given (precision slowest), duplicates dropped."""
    keys: list[ConfigKey] = []
    for p in precisions:
        for vp in vision_precisions or [None]:
            for n in vision_sizes or [None]:
                k = ConfigKey(p, vp or p, n)
                if k not in keys:
                    keys.append(k)
    return keys


def key_of(row: dict) -> tuple[str, str, int | None]:
    """The join key of a result row."""
    return row.get("precision"), row.get("vision_precision") or row.get("precision"), row.get("vision_size")
