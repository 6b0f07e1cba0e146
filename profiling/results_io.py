"""Result files: JSON lines (one object per configuration), CSV (nested fields flattened), with readable errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=False) + "\n")
    return path


def iter_jsonl(path: str | Path, what: str = "file"):
    """(line number, object) for every object of a JSON-lines file; blank lines skipped; errors name ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_jsonl(path: str | Path) -> list[dict]:
    """Every object of a JSON-lines file (see :func:`iter_jsonl`)."""
    return [row for _, row in iter_jsonl(path)]


def results_file(path: str | Path) -> Path:
    """A results.jsonl given itself or the folder holding it."""
    path = Path(path)
    return path / "results.jsonl" if path.is_dir() else path


def flatten(row: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}; lists become JSON text, so a CSV cell holds them intact."""
    out = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def write_csv(path: str | Path, rows: list[dict], first: tuple[str, ...] = ()) -> Path:
    """One row per result; columns ``first`` lead, the rest follow in order of first appearance."""
    flat = [flatten(r) for r in rows]
    columns = [c for c in first if any(c in r for r in flat)]
    for r in flat:
        columns += [c for c in r if c not in columns]
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in flat:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    return path
