"""The typed result rows: docs/PROFILING.md documents exactly their fields, real runs' rows load into them with
nothing undeclared and write back unchanged, and an undeclared key is refused."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from glm4v_edge.cli import main
from profiling.rows import AnswerRow, EvalRow, ProfileRow, ReportRow

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROFILING.md"
CLASSES = (ProfileRow, EvalRow, AnswerRow, ReportRow)


def _doc_tables() -> dict[str, list[tuple[str, str]]]:
    """{class name: [(field, type), ...]} from the tables under each "### … (`ClassName`)" heading of the
    "Output fields" section."""
    text = DOC.read_text()
    section = text.split("## Output fields (machine-readable)\n", 1)[1].split("\n## ", 1)[0]
    tables: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in section.splitlines():
        heading = re.match(r"###\s.*\(`(\w+)`\)\s*$", line)
        if heading:
            current = tables.setdefault(heading.group(1), [])
            continue
        if current is None or not line.startswith("| `"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        current.append((cells[0].strip("`"), cells[1].strip("`")))
    return tables


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _round_trip(cls, row: dict) -> None:
    """Loads with no unknown key, and writes back the same keys, values and order."""
    written = cls.from_dict(row).to_dict()
    assert written == row and list(written) == list(row)


def test_docs_tables_are_the_dataclass_fields_in_order():
    tables = _doc_tables()
    assert sorted(tables) == sorted(c.__name__ for c in CLASSES)
    for cls in CLASSES:
        assert tables[cls.__name__] == [(f.name, f.type) for f in fields(cls)], cls.__name__


def test_real_runs_load_into_the_dataclasses(profile_out, eval_out, tmp_path):
    (prc, prof), (erc, ev) = profile_out, eval_out
    assert prc == erc == 0
    profile_rows = _rows(prof / "results.jsonl")
    assert [r["status"] for r in profile_rows] == ["ok", "ok"]
    for r in profile_rows:
        _round_trip(ProfileRow, r)
    eval_rows = _rows(ev / "results.jsonl")
    for r in eval_rows:
        _round_trip(EvalRow, r)
    assert [r["is_reference"] for r in eval_rows] == [True, False, False]
    for r in _rows(ev / "answers.jsonl"):
        _round_trip(AnswerRow, r)
    out = tmp_path / "report"
    assert main(["report", "--profile", str(prof), "--eval", str(ev), "--out", str(out)]) == 0
    report_rows = _rows(out / "report.jsonl")
    assert len(report_rows) == 4
    for r in report_rows:
        _round_trip(ReportRow, r)
        assert list(r) == ReportRow.field_names()  # one schema for every row


def test_a_gpu_row_keeps_its_nvml_and_cuda_fields_in_order(profile_out):
    """The worker's row as it is built on a GPU: the sampler's NVML summary (scripted fake NVML), the CUDA
    allocator's five peaks and context_and_slack_bytes, spliced where run() puts them."""
    from profiling.memory_sampler import MemorySampler
    from profiling.torch_memory import TorchAllocatorPeaks

    from .test_memory_sampler import FakeNvml

    _, prof = profile_out
    cpu = _rows(prof / "results.jsonl")[1]
    sampler = MemorySampler("cuda:0", nvml=FakeNvml())
    sampler.start()
    sampler.set_phase("idle")
    sampler.set_phase("prefill")
    sampler.stop()
    allocator = TorchAllocatorPeaks("cpu")
    allocator.enabled, allocator.allocated_idle_bytes = True, 4
    allocator.allocated_peak, allocator.reserved_peak = {"prefill": 5, "decode": 6}, {"prefill": 8, "decode": 8}
    keys = list(cpu)
    before, middle = keys[: keys.index("memory_source")], keys[keys.index("weight_bytes") :]
    gpu = {**{k: cpu[k] for k in before}, **sampler.summary(), **allocator.summary()}
    for k in middle:
        gpu[k] = cpu[k]
        if k == "decode_above_idle_bytes":
            gpu["context_and_slack_bytes"] = gpu["process_used_peak_bytes"] - gpu["torch_reserved_peak_bytes"]
    gpu["device"] = "cuda:0"
    assert len(gpu) == len(cpu) + 7 and gpu["memory_source"] == "nvml"
    _round_trip(ProfileRow, gpu)


def test_conditional_fields_follow_the_row():
    failed = ProfileRow(
        label="nf4@112",
        role="config",
        status="oom",
        precision="nf4",
        vision_precision="nf4",
        vision_size=112,
        device="cpu",
        model="m",
        estimated_bytes=1,
        command="c",
        error="OOM",
        log="l",
        log_tail=[],
    )
    d = failed.to_dict()
    assert list(d) == [
        "label",
        "role",
        "status",
        "precision",
        "vision_precision",
        "vision_size",
        "device",
        "model",
        "estimated_bytes",
        "command",
        "error",
        "log",
        "log_tail",
    ]
    ok = ProfileRow.from_dict(
        {
            **{k: v for k, v in d.items() if k not in ("error", "log", "log_tail")},
            "status": "ok",
            "device": "cuda:0",
            "memory_source": "nvml",
        }
    )
    written = ok.to_dict()
    assert written["device_used_peak_bytes"] is None and written["torch_allocated_decode_peak_bytes"] is None
    assert "error" not in written and "context_and_slack_bytes" not in written and "baseline_label" not in written
    http = EvalRow(label="s @ u", precision="unknown", vision_precision=None, vision_size=None, base_url="u")
    assert "device" not in http.to_dict() and http.to_dict()["served_model"] is None


def test_an_unknown_or_misplaced_key_is_refused():
    row = {
        "config": "nf4@112",
        "id": "q1",
        "category": "colour",
        "question": "Which colour?",
        "answers": ["red"],
        "prediction": "red",
        "correct": True,
    }
    assert AnswerRow.from_dict(row).to_dict() == row
    with pytest.raises(ValueError, match="AnswerRow: unknown field.*'latency_s'.*profiling/rows.py"):
        AnswerRow.from_dict({**row, "latency_s": 0.1})
    with pytest.raises(ValueError, match="missing required field.*'prediction'"):
        AnswerRow.from_dict({k: v for k, v in row.items() if k != "prediction"})
    ok = {
        "label": "nf4@112",
        "role": "config",
        "status": "ok",
        "precision": "nf4",
        "vision_precision": "nf4",
        "vision_size": 112,
        "device": "cpu",
    }
    with pytest.raises(ValueError, match="ProfileRow: unknown field.*'vram_bytes'"):
        ProfileRow.from_dict({**ok, "vram_bytes": 1})
    with pytest.raises(ValueError, match="'error' \\(written only when failed\\)"):
        ProfileRow.from_dict({**ok, "error": "boom"})  # would be silently lost on an ok row
    with pytest.raises(ValueError, match="'device_used_peak_bytes' \\(written only when nvml\\)"):
        ProfileRow.from_dict({**ok, "memory_source": "rss", "device_used_peak_bytes": 1})
