"""The files of ``glm4v-edge gpu-check``: results.jsonl (a ``meta`` row, then one row per step), results.md and the
two plots, rewritten whenever a row changes so that a run cut short still leaves everything it measured.

Row kinds: ``environment`` (one), ``config`` (one per configuration; the compile step's fields join its row) and
``http`` (one per concurrency level). Each row has a ``status``: ok, skipped (with ``skipped_reason``), error, oom,
timeout (with ``error``), or running while its step runs. The columns are described in docs/GPU.md.
"""

from __future__ import annotations

from pathlib import Path

GIB = 2**30


def _gib(v) -> str:
    """GiB with two decimals; below 0.1 GiB (the tiny CPU model) in MiB, so it does not read as zero."""
    if v is None:
        return "—"
    return f"{v / GIB:.2f}" if abs(v) >= 0.1 * GIB else f"{v / 2**20:.1f} MiB"


def _num(v, fmt: str = "{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.0f} %"


def table(rows: list[dict], columns: list[tuple[str, object]]) -> list[str]:
    """Markdown table: ``columns`` = (header, key or function of the row)."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [str(get(r) if callable(get) else ("—" if r.get(get) is None else r.get(get))) for _, get in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


class Results:
    """The rows of one check; :meth:`save` writes them (and the plots, when asked)."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.meta, self.rows = out, meta, []

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.save()
        return row

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.rows if r.get("kind") == kind]

    def environment(self) -> dict:
        return next(iter(self.of("environment")), {})

    def save(self, _=None, plots: bool = False) -> None:
        """Rewrite results.jsonl and results.md (the unused first argument lets ``save(row.update(...))`` read as
        one expression); with ``plots`` the PNGs too."""
        from .results_io import write_jsonl

        bandwidth = self.environment().get("bandwidth_bytes_per_s")
        for r in self.of("config"):
            for b in self.meta["batches"]:
                for sfx in ("", "_compiled"):
                    got = r.get(f"decode_bytes_per_s_b{b}{sfx}")
                    if got is not None and bandwidth:
                        r[f"decode_bandwidth_fraction_b{b}{sfx}"] = got / bandwidth
        write_jsonl(self.out / "results.jsonl", [{"kind": "meta", **self.meta}] + self.rows)
        (self.out / "results.md").write_text(self.markdown())
        if plots:
            try:
                self.plot()
            except Exception as e:  # a plot must never cost the numbers
                self.meta["plot_error"] = f"{type(e).__name__}: {e}"

    def where(self) -> str:
        e = self.environment()
        if e.get("gpu_name"):
            return f"{e['gpu_name']} (driver {e.get('gpu_driver')}, CUDA {e.get('torch_cuda')})"
        if e.get("cpu"):
            return f"{e['cpu']} ({e.get('cpu_cores', '?')} cores, no GPU)"
        return f"{self.meta['device']} (environment not measured)"

    def markdown(self) -> str:
        m, bs = self.meta, self.meta["batches"]
        lines = [f"# gpu-check: {self.where()}, {m['started']}", "", f"- command: `{m['command']}`"]
        lines.append(f"- device `{m['device']}`, `--synthetic {m['synthetic']}` (random weights)")
        lines.append(f"- budget {m['budget_s']:.0f} s")
        if "elapsed_s" in m:
            lines.append(f"- finished in {m['elapsed_s']:.0f} s")
        lines += ["", "## Environment", "", *self.environment_lines()]
        speed = [(f"tok/s b{b}", lambda r, b=b: _num(r.get(f"decode_tok_s_b{b}"), "{:.1f}")) for b in bs]
        speed += [(f"compiled b{b}", lambda r, b=b: _num(r.get(f"decode_tok_s_b{b}_compiled"), "{:.1f}")) for b in bs]
        speed += [(f"of bandwidth b{b}", lambda r, b=b: _pct(r.get(f"decode_bandwidth_fraction_b{b}"))) for b in bs]
        lines += ["", "## Configurations", "", "GiB; `used` = NVML process-used on a GPU, RSS on a CPU.", ""]
        lines += table(
            self.of("config"),
            [
                ("configuration", "name"),
                ("flags", lambda r: f"`{r.get('flags')}`"),
                ("status", "status"),
                ("weights", lambda r: _gib(r.get("weight_bytes"))),
                ("used after load", lambda r: _gib(r.get("used_after_load_bytes"))),
                ("torch alloc after load", lambda r: _gib(r.get("torch_allocated_after_load_bytes"))),
                ("used peak, image + prompt", lambda r: _gib(r.get("peak_used_bytes"))),
                ("torch alloc peak", lambda r: _gib(r.get("torch_allocated_peak_bytes"))),
                ("load s", lambda r: _num(r.get("load_s"), "{:.1f}")),
                ("vision encode s", lambda r: _num(r.get("vision_encode_s"), "{:.3f}")),
                ("TTFT s", lambda r: _num(r.get("ttft_s"), "{:.3f}")),
                *speed,
                ("other CPU load", lambda r: _pct(r.get("decode_other_cpu_share"))),
            ],
        )
        lines += ["", "## Card emulation", ""]
        lines += table(
            self.of("config"),
            [
                ("configuration", "name"),
                ("estimated total", lambda r: _gib(r.get("estimated_total_bytes"))),
                ("claimed card (GiB)", "claimed_card_gib"),
                ("cap = card − context", lambda r: _gib(r.get("card_cap_bytes"))),
                ("result", lambda r: r.get("card_status") or "—"),
                ("peak used", lambda r: _gib(r.get("card_peak_used_bytes"))),
                ("note", lambda r: r.get("card_failed_at") or r.get("card_note") or ""),
            ],
        )
        lines += ["", "## HTTP: serve nf4 + bench-serve", ""]
        lines += table(
            self.of("http"),
            [
                ("concurrency", "concurrency"),
                ("status", "status"),
                ("completed", lambda r: f"{r.get('completed', '—')}/{r.get('requests', '—')}"),
                ("out tok/s", lambda r: _num(r.get("output_tokens_per_s"), "{:.1f}")),
                ("TTFT p50 s", lambda r: _num(r.get("ttft_s_p50"), "{:.3f}")),
                ("TPOT p50 ms", lambda r: _num(r.get("tpot_s_p50") and r["tpot_s_p50"] * 1e3, "{:.1f}")),
                ("e2e p50 s", lambda r: _num(r.get("e2e_s_p50"), "{:.2f}")),
                ("server ready s", lambda r: _num(r.get("server_ready_s"), "{:.1f}")),
            ],
        )
        return "\n".join(lines + ["", "## Skipped, failed, not run", "", *self.note_lines()]) + "\n"

    def environment_lines(self) -> list[str]:
        e = self.environment()
        if not e:
            return ["not measured yet"]
        bw = e.get("bandwidth_bytes_per_s")
        why = e.get("error") or e.get("skipped_reason")
        wheels = ", ".join(e.get("wheels_installed") or []) or e.get("wheels_note")
        return [
            f"- status: {e.get('status')}" + (f" — {why}" if why else ""),
            f"- python {e.get('python')} (`{e.get('python_executable')}`), torch {e.get('torch')} (CUDA "
            f"{e.get('torch_cuda')}), transformers {e.get('transformers')}, bitsandbytes {e.get('bitsandbytes')}, "
            f"fastapi {e.get('fastapi')}, uvicorn {e.get('uvicorn')}, pydantic {e.get('pydantic')}",
            f"- bitsandbytes on `{e.get('device')}`: nf4 {e.get('bnb_nf4')}, int8 {e.get('bnb_int8')}",
            f"- memory bandwidth: {_num(bw and bw / 1e9, '{:.0f}')} GB/s ({e.get('bandwidth_how')}, "
            f"{_gib(e.get('bandwidth_copy_bytes'))} GiB)",
            f"- CUDA context: {_gib(e.get('cuda_context_bytes'))} GiB ({e.get('cuda_context_source')})",
            f"- wheels: {wheels}" + (f" → `{e['wheels_target']}`" if e.get("wheels_target") else ""),
        ]

    def note_lines(self) -> list[str]:
        notes = [
            f"- {r['kind']} {r.get('name') or r.get('concurrency') or ''}: {r['status']} — "
            f"{r.get('skipped_reason') or r.get('error')}"
            for r in self.rows
            if r.get("status") not in ("ok", None, "running")
        ]
        notes += [f"- compile {r['name']}: {r['compile_status']}" for r in self.of("config") if r.get("compile_status")]
        notes += [f"- card {r['name']}: {r['card_note']}" for r in self.of("config") if r.get("card_note")]
        return notes or ["nothing"]

    def plot(self) -> None:
        from .plots import plot_memory

        ok = [r for r in self.of("config") if r.get("status") == "ok"]
        env = self.environment()
        machine = {"gpu_name": env.get("gpu_name"), "cpu": env.get("cpu"), "cpu_cores": env.get("cpu_cores")}
        base = next((r.get("peak_used_bytes") for r in ok if r["name"] == "bf16"), None)
        view = [
            {
                "status": "ok",
                "label": r["name"],
                "peak_memory_bytes": r.get("peak_used_bytes"),
                "idle_memory_bytes": r.get("used_after_load_bytes"),
                "memory_source": r.get("memory_source"),
                "baseline_peak_memory_bytes": base,  # bf16: the fp16-class baseline
                "machine": machine,
            }
            for r in ok
        ]
        plot_memory(view, self.out / "memory.png")
        self.plot_speed(ok)

    def plot_speed(self, ok: list[dict]) -> None:
        """Decode tokens/s per configuration: one bar per batch size, eager and compiled."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        series = [(b, s) for s in ("", "_compiled") for b in self.meta["batches"]]
        series = [(b, s) for b, s in series if any(r.get(f"decode_tok_s_b{b}{s}") for r in ok)]
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(ok) + 2), 4.5))
        width = 0.8 / max(1, len(series))
        for i, (b, s) in enumerate(series):
            xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(ok))]
            vals = [r.get(f"decode_tok_s_b{b}{s}") or 0 for r in ok]
            ax.bar(xs, vals, width, label=f"batch {b}" + (" compiled" if s else ""))
            for x, v in zip(xs, vals, strict=True):
                ax.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(ok)), [r["name"] for r in ok], rotation=20, fontsize=8)
        ax.set_ylabel("decode tokens/s (median step)")
        ax.set_title(f"Decode speed per configuration\n{self.where()}", fontsize=10)
        if series:
            ax.legend(fontsize=8)
        ax.margins(y=0.15)
        fig.tight_layout()
        fig.savefig(self.out / "tokens_per_s.png", dpi=110)
        plt.close(fig)
