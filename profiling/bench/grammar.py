"""Measure the grammar engines for structured outputs: mask time per decode step and grammar compile time.

    glm4v-edge bench-grammar --tokenizer ../shared/real_tokenizer --out bench-grammar/

How ``response_format`` JSON Schema was given its engine (docs/PERFORMANCE.md, "Structured outputs"). For each
engine installed (``llguidance``, ``xgrammar``) it measures, with GLM-4's vocabulary (the real ``tokenizer.model``
when ``--tokenizer`` names a folder or file holding it, else the tiny checkpoint's) padded to the LM head's 151,552
rows:

* **tokenizer setup** — building the engine's view of the vocabulary (once per server);
* **compile** — a 20-field nested JSON Schema to a ready matcher, its first mask included (per new schema; the
  server caches compiled schemas), cold and then as the cache would serve it;
* **mask per step** — at batch 1 and batch 8, the engine-thread work of one decode step: fill each row's bitmask,
  apply it to that row's (B, 151552) float32 logits, advance each matcher by one token. The rows walk through a
  valid document of that schema token by token (8 different documents at batch 8), so every kind of grammar state
  is visited — keys, strings, numbers, enums, nested objects, arrays.

Writes ``results.json`` and ``results.md``. Neither engine is needed at import time.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import statistics
import time
from pathlib import Path

log = logging.getLogger(__name__)

ENGINES = ("llguidance", "xgrammar")
LM_HEAD_ROWS = 151_552  # GLM-4V-9B's padded_vocab_size: the logits row the mask is applied to


def add_arguments(p) -> None:
    p.add_argument(
        "--tokenizer",
        default="../shared/real_tokenizer",
        help="folder or tokenizer.model file with GLM-4's rank file (default ../shared/real_tokenizer; when it is "
        "absent the tiny checkpoint's tokenizer is used and the results say so)",
    )
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--batch", default="1,8", help="comma list of batch sizes (default 1,8)")
    p.add_argument("--repeats", type=int, default=3, help="documents walked per row (default 3)")
    p.add_argument("--out", required=True, help="folder for results.json and results.md")


# ---- the workload ---------------------------------------------------------------------------------------------
def nested_schema() -> dict:
    """A 20-field nested schema of the kind extraction asks for (an invoice): strings, patterns, enums, bounded
    numbers, nested objects and an array of objects."""
    address = {
        "type": "object",
        "properties": {
            "street": {"type": "string", "maxLength": 40},
            "city": {"type": "string", "maxLength": 30},
            "postcode": {"type": "string", "pattern": "^[0-9]{5}$"},
            "country": {"type": "string", "enum": ["DE", "FR", "CN", "US"]},
        },
        "required": ["street", "city", "postcode", "country"],
        "additionalProperties": False,
    }
    item = {
        "type": "object",
        "properties": {
            "description": {"type": "string", "maxLength": 40},
            "quantity": {"type": "integer", "minimum": 1, "maximum": 999},
            "unit_price": {"type": "number", "minimum": 0},
        },
        "required": ["description", "quantity", "unit_price"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "invoice_number": {"type": "string", "pattern": "^INV-[0-9]{4,8}$"},
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "currency": {"type": "string", "enum": ["EUR", "USD", "CNY"]},
            "paid": {"type": "boolean"},
            "seller": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 40}, "address": address},
                "required": ["name", "address"],
                "additionalProperties": False,
            },
            "buyer": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 40}, "vat_id": {"type": "string"}},
                "required": ["name"],
                "additionalProperties": False,
            },
            "items": {"type": "array", "items": item, "minItems": 1, "maxItems": 20},
            "total": {"type": "number", "minimum": 0},
            "notes": {"type": ["string", "null"]},
        },
        "required": ["invoice_number", "date", "currency", "paid", "seller", "buyer", "items", "total"],
        "additionalProperties": False,
    }


def documents(n: int) -> list[str]:
    """``n`` different valid documents of :func:`nested_schema`, written as the
    server's grammar asks, with some non-ASCII text."""
    cities = ["Berlin", "Lyon", "上海", "Austin", "Köln", "北京市", "Nice", "Boston"]
    out = []
    for i in range(n):
        doc = {
            "invoice_number": f"INV-{1000 + 37 * i}",
            "date": f"2024-0{1 + i % 9}-1{i % 10}",
            "currency": ["EUR", "USD", "CNY"][i % 3],
            "paid": i % 2 == 0,
            "seller": {
                "name": f"Acme Supplies {i}",
                "address": {
                    "street": f"{12 + i} Main Street",
                    "city": cities[i % len(cities)],
                    "postcode": f"{10115 + i:05d}",
                    "country": ["DE", "FR", "CN", "US"][i % 4],
                },
            },
            "buyer": {"name": f"Customer number {i}", "vat_id": f"DE{123456789 + i}"},
            "items": [
                {"description": f"Widget type {j}", "quantity": 1 + j, "unit_price": round(9.99 * (j + 1), 2)}
                for j in range(1 + i % 3)
            ],
            "total": round(123.45 + i, 2),
            "notes": None if i % 2 else "Thank you for your business.",
        }
        out.append(json.dumps(doc, separators=(", ", ": "), ensure_ascii=False))
    return out


def load_tokenizer(path: str):
    """(GLM4Tokenizer, which) — the real rank file when ``path`` leads to one, else the tiny checkpoint's."""
    from glm4v.tokenizer import SPECIAL_TOKENS, GLM4Tokenizer, read_rank_file

    p = Path(path)
    rank_file = p / "tokenizer.model" if p.is_dir() else p
    if rank_file.is_file():
        ranks = read_rank_file(rank_file)
        specials = {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}  # GLM-4's ids: 151329 …
        return GLM4Tokenizer(ranks, specials), f"real GLM-4 tokenizer.model ({len(ranks):,} ranks)"
    import tempfile

    from glm4v.tiny import write_checkpoint

    tok = GLM4Tokenizer.from_pretrained(write_checkpoint(Path(tempfile.mkdtemp(prefix="bench-grammar-")) / "tiny"))
    return tok, f"the tiny checkpoint's tokenizer ({tok.n_ranks:,} ranks; {path} not found)"


# ---- one engine -----------------------------------------------------------------------------------------------
class _Llguidance:
    name = "llguidance"

    def __init__(self, tok, vocab: int, stop_ids: list[int]):
        from engine.structured import GrammarCompiler

        self.compiler = GrammarCompiler(tok, vocab, stop_ids, cache_size=0)
        self.compiler.ll_tokenizer()  # built on first use in the server; counted as setup here

    def compile(self, schema: dict):
        return self.compiler.compile({"type": "json_schema", "schema": schema})

    def matcher(self, compiled):
        return compiled.matcher()

    def fill(self, matchers, bitmask) -> None:
        for i, m in enumerate(matchers):
            m.fill_bitmask(bitmask, i)

    def accept(self, m, tok: int) -> None:
        m.accept(tok)


class _Xgrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab: int, stop_ids: list[int]):
        import xgrammar as xgr

        encoded = [b""] * vocab
        for i in range(tok.n_ranks):
            encoded[i] = tok.token_bytes(i)
        info = xgr.TokenizerInfo(encoded, xgr.VocabType.RAW, vocab_size=vocab, stop_token_ids=stop_ids)
        self.xgr = xgr
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(", ", ": "), strict_mode=True
        )

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers, bitmask) -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    def accept(self, m, tok: int) -> None:
        if not m.accept_token(tok):
            raise RuntimeError(f"xgrammar refused token {tok}")


def _setup(engine: str, tok, vocab: int, stop_ids: list[int]):
    return {"llguidance": _Llguidance, "xgrammar": _Xgrammar}[engine](tok, vocab, stop_ids)


def measure(engine: str, tok, batches: list[int], repeats: int) -> dict:
    import torch

    from engine.structured import apply_bitmask

    stop_ids = [tok.token_id("<|endoftext|>"), tok.token_id("<|user|>"), tok.token_id("<|observation|>")]
    t0 = time.perf_counter()
    eng = _setup(engine, tok, LM_HEAD_ROWS, stop_ids)
    setup_s = time.perf_counter() - t0
    schema = nested_schema()
    compile_cold = []
    for _ in range(3):
        t0 = time.perf_counter()
        compiled = eng.compile(schema)
        m = eng.matcher(compiled)
        bm = torch.zeros(1, (LM_HEAD_ROWS + 31) // 32, dtype=torch.int32)
        eng.fill([m], bm)
        compile_cold.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    m = eng.matcher(compiled)  # what a cache hit costs: a fresh matcher for an already-compiled grammar
    eng.fill([m], bm)
    cached_s = time.perf_counter() - t0

    docs = [[tok.encode(d) for d in documents(8 * repeats)]][0]
    row = {
        "engine": engine,
        "version": importlib.metadata.version(engine),
        "tokenizer_setup_s": setup_s,
        "compile_s": statistics.median(compile_cold),
        "compile_cached_s": cached_s,
        "batches": {},
    }
    for b in batches:
        fill_ms, apply_ms, accept_ms, steps = [], [], [], 0
        logits = torch.randn(b, LM_HEAD_ROWS)
        bitmask = torch.zeros(b, (LM_HEAD_ROWS + 31) // 32, dtype=torch.int32)
        for r in range(repeats):
            rows = [docs[(r * b + i) % len(docs)] + stop_ids[:1] for i in range(b)]
            matchers = [eng.matcher(compiled) for _ in range(b)]
            for step in range(max(map(len, rows))):
                live = [(i, m) for i, m in enumerate(matchers) if step < len(rows[i])]
                t0 = time.perf_counter()
                eng.fill([m for _, m in live], bitmask)
                t1 = time.perf_counter()
                apply_bitmask(logits, bitmask[: len(live)], [i for i, _ in live])  # as the engine does
                t2 = time.perf_counter()
                for i, m in live:
                    want = rows[i][step]
                    if not (bitmask[live.index((i, m)), want // 32] >> (want % 32)) & 1:
                        raise RuntimeError(f"{engine}: the mask forbids a token of a valid document at step {step}")
                    eng.accept(m, want)
                t3 = time.perf_counter()
                if len(live) == b:  # full-batch steps only: the figure is per batch size
                    fill_ms.append((t1 - t0) * 1e3)
                    apply_ms.append((t2 - t1) * 1e3)
                    accept_ms.append((t3 - t2) * 1e3)
                    steps += 1
        total = [f + a + c for f, a, c in zip(fill_ms, apply_ms, accept_ms, strict=True)]
        row["batches"][str(b)] = {
            "steps": steps,
            "fill_ms_mean": statistics.fmean(fill_ms),
            "fill_ms_p99": sorted(fill_ms)[int(0.99 * (len(fill_ms) - 1))],
            "apply_ms_mean": statistics.fmean(apply_ms),
            "accept_ms_mean": statistics.fmean(accept_ms),
            "step_ms_mean": statistics.fmean(total),
            "step_ms_p50": statistics.median(total),
            "step_ms_p99": sorted(total)[int(0.99 * (len(total) - 1))],
        }
    return row


def render(result: dict) -> str:
    lines = [
        "# bench-grammar",
        "",
        f"Machine: {result['machine']}. Vocabulary: {result['tokenizer']}, mask over {LM_HEAD_ROWS:,} logits.",
        f"Command: `{result['command']}`",
        "",
        "| engine | version | tokenizer setup s | compile 20-field schema ms | cached ms | batch | step ms mean "
        "| p50 | p99 | of which fill | apply | accept |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["engines"]:
        if "error" in r:
            lines.append(f"| {r['engine']} | — | {r['error']} |||||||||")
            continue
        for b, s in r["batches"].items():
            lines.append(
                f"| {r['engine']} | {r['version']} | {r['tokenizer_setup_s']:.2f} | {r['compile_s'] * 1e3:.1f} "
                f"| {r['compile_cached_s'] * 1e3:.2f} | {b} | {s['step_ms_mean']:.3f} | {s['step_ms_p50']:.3f} "
                f"| {s['step_ms_p99']:.3f} | {s['fill_ms_mean']:.3f} | {s['apply_ms_mean']:.3f} "
                f"| {s['accept_ms_mean']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def run(args) -> int:
    import os

    import torch

    from ..cli_args import comma_list
    from ..system_info import cpu_model, current_command

    tok, which = load_tokenizer(args.tokenizer)
    batches = [int(b) for b in comma_list(args.batch)]
    result = {
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}",
        "tokenizer": which,
        "command": current_command(args),
        "engines": [],
    }
    for engine in comma_list(args.engines):
        if engine not in ENGINES:
            raise SystemExit(f"--engines: unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
        try:
            __import__(engine)
        except ImportError:
            result["engines"].append({"engine": engine, "error": "not installed"})
            continue
        log.info("measuring %s", engine)
        result["engines"].append(measure(engine, tok, batches, args.repeats))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(render(result))
    print(render(result))
    return 0
