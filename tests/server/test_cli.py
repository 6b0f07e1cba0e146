"""`glm4v-edge serve`: flags and environment variables, startup warnings, and the real command end to end."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from dataclasses import fields

import httpx
import openai

from glm4v_edge.serve import add_arguments
from server.launch import startup_warnings
from server.settings import ServerSettings

from ..support import REPO, data_url, png_bytes, start_serve, user_with_image


def parse(argv: list[str]) -> ServerSettings:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return ServerSettings.from_args(p.parse_args(argv))


def test_flags_env_and_defaults(monkeypatch):
    assert parse([]) == ServerSettings()
    monkeypatch.setenv("GLM4V_MAX_QUEUE", "7")
    monkeypatch.setenv("GLM4V_API_KEY", "from-env")
    monkeypatch.setenv("GLM4V_ALLOW_PRIVATE_URLS", "true")
    monkeypatch.setenv("GLM4V_NO_DOUBLE_QUANT", "1")
    s = parse(["--port", "9001", "--precision", "nf4", "--low-detail-size", "224"])
    assert (s.max_queue, s.api_key, s.allow_private_urls, s.double_quant) == (7, "from-env", True, False)
    assert (s.port, s.precision, s.low_detail_size) == (9001, "nf4", 224)
    assert parse(["--max-queue", "3"]).max_queue == 3  # the flag beats the variable


def test_bad_environment_values_and_settings_are_clear_errors(monkeypatch, caplog):
    import pytest

    from glm4v_edge.serve import run

    monkeypatch.setenv("GLM4V_COMPILE", "fast")
    with pytest.raises(SystemExit, match="GLM4V_COMPILE='fast' is invalid: choose from off, reduce-overhead"):
        parse([])
    monkeypatch.setenv("GLM4V_COMPILE", "cudagraphs")
    assert parse([]).compile == "cudagraphs" and parse(["--compile"]).compile == "reduce-overhead"
    monkeypatch.delenv("GLM4V_COMPILE")
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert run(p.parse_args(["--max-queue", "0"])) == 2  # refused before anything loads
    assert "max_queue must be at least 1" in caplog.text


def test_every_setting_has_a_flag_with_an_env_variable():
    p = argparse.ArgumentParser()
    add_arguments(p)
    helps = {a.dest: a.help for a in p._actions}
    for f in fields(ServerSettings):
        dest = "no_double_quant" if f.name == "double_quant" else f.name
        assert dest in helps, f.name
        assert f"[env: GLM4V_{dest.upper()}]" in helps[dest], f.name


def test_startup_warnings():
    assert startup_warnings(ServerSettings()) == []
    assert any("0.0.0.0" in w for w in startup_warnings(ServerSettings(host="0.0.0.0")))
    assert startup_warnings(ServerSettings(host="0.0.0.0", api_key="k")) == []
    assert any("private" in w for w in startup_warnings(ServerSettings(allow_private_urls=True)))
    assert any("'*'" in w for w in startup_warnings(ServerSettings(cors_origins="*")))


def test_serve_command_end_to_end_with_sigterm_mid_stream(tiny_dir, tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes())
    proc, url = start_serve(
        ["--model", str(tiny_dir), "--precision", "fp32", "--max-model-len", "1024", "--shutdown-timeout", "20"],
        {"GLM4V_API_KEY": "k3y"},
        tmp_path / "serve.log",
    )
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0)
        assert client.models.retrieve("glm-4v-9b").model_dump()["precision"] == "fp32"
        r = client.chat.completions.create(
            model="glm-4v-9b", messages=[user_with_image(data_url(png_bytes()))], max_tokens=5
        )
        assert r.usage.prompt_tokens > 18 and r.choices[0].finish_reason in ("stop", "length")
        example = subprocess.run(
            [
                sys.executable,
                "examples/chat_client.py",
                "--base-url",
                f"{url}/v1",
                "--image",
                str(image),
                "--stream",
                "--max-tokens",
                "8",
                "--follow-up",
                "Is it spring or winter?",
                "What is in this image?",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "GLM4V_API_KEY": "k3y"},
        )
        assert example.returncode == 0, example.stderr
        assert example.stderr.count("[finish_reason=") == 2 and '"prompt_tokens"' in example.stderr

        body = {
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 300,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer k3y"}, timeout=60
        ) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)  # the running stream gets to finish (--shutdown-timeout 20)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 300
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "serve.log").read_text()
    assert "Application shutdown complete" in log and "Traceback" not in log


def test_serve_without_model_runs_the_demo_that_sees_and_stops_on_sigint(tmp_path):
    """What `make serve` runs: the shipped demo model, said loudly, answering about a picture it has never seen."""
    proc, url = start_serve([], {}, tmp_path / "demo.log")
    try:
        card = httpx.get(f"{url}/v1/models").json()["data"][0]
        assert (
            card["demo"] is True
            and card["root"] == "demo_model"
            and "glm4v-edge/demo" in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        )
        for shape, colour in (("circle", "red"), ("triangle", "blue"), ("square", "yellow")):
            out = subprocess.run(
                [sys.executable, str(REPO / "examples" / "demo_request.py"), "--base-url", f"{url}/v1",
                 "--shape", shape, "--colour", colour],
                capture_output=True, text=True, timeout=60, check=True,
            )  # fmt: skip
            assert out.stdout.strip() == f"It is {colour}.", out
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "demo.log").read_text()
    assert "NOT GLM-4V-9B" in log and "Traceback" not in log


def test_serve_refuses_a_missing_media_folder(tmp_path, caplog):
    from glm4v_edge.serve import run

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert run(p.parse_args(["--allowed-local-media-path", str(tmp_path / "nope")])) == 2
    assert "not a folder" in caplog.text
