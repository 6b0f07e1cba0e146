"""`glm4v-edge serve-cluster` as users run it (its own module: the other cluster tests' Ray is shut down first, so
one local Ray runs at a time)."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from ..support import free_port

pytest.importorskip("ray.serve")


def test_the_serve_cluster_command(tiny_dir, tmp_path):
    """`glm4v-edge serve-cluster` from the command line: starts its own local Ray, prints the URL, answers, and
    stops cleanly on SIGINT (run after the module's cluster is shut down: one Ray at a time)."""
    import subprocess
    import sys

    port = free_port()
    log = tmp_path / "serve-cluster.log"
    cmd = [sys.executable, "-m", "glm4v_edge", "serve-cluster", "--model", str(tiny_dir), "--precision", "fp32"]
    cmd += ["--port", str(port), "--replicas", "1", "--max-model-len", "256"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 150
        while "serving on" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert f"http://127.0.0.1:{port}/v1 (1 replica, 0 GPU each)" in log.read_text()
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            timeout=60,
        )
        assert r.status_code == 200 and r.headers["x-glm4v-replica"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
