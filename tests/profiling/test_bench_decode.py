"""glm4v-edge bench-decode: times every mode it is given and writes the documented files; bad input is refused."""

from __future__ import annotations

import json

from glm4v_edge.cli import main


def test_bench_decode_writes_results(tmp_path, capsys):
    out = tmp_path / "bd"
    rc = main(
        [
            "--log-level",
            "WARNING",
            "bench-decode",
            "--synthetic",
            "tiny",
            "--device",
            "cpu",
            "--modes",
            "off,static",
            "--batch",
            "1,3",
            "--context",
            "40",
            "--steps",
            "4",
            "--warmup",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["context"] == 40 and data["meta"]["max_model_len"] == 256
    assert [r["mode"] for r in data["results"]] == ["off", "static"]
    for res in data["results"]:
        assert [b["batch"] for b in res["batches"]] == [1, 3]
        assert all(b["step_ms_p50"] > 0 and b["tokens_per_s"] > 0 for b in res["batches"])
    md = (out / "results.md").read_text()
    assert "| static | 3 |" in md and "vs off" in md
    assert "| off | 1 |" in capsys.readouterr().out


def test_bench_decode_refuses_bad_input(tmp_path, capsys):
    assert main(["bench-decode", "--modes", "off,turbo", "--out", str(tmp_path)]) == 2
    assert "--modes takes" in capsys.readouterr().err
    assert main(["bench-decode", "--batch", "0", "--out", str(tmp_path)]) == 2
    assert main(["bench-decode", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert main(["bench-decode", "--context", "300", "--max-model-len", "256", "--out", str(tmp_path)]) == 2
    assert "no room" in capsys.readouterr().err
