"""``eval --base-url``: plain OpenAI chat completions over a real socket, against a small local HTTP server.

The stub stands in for any OpenAI-compatible server (tests/profiling/test_eval_against_server.py runs it against
ours). It knows each synthetic image's
answer by the image's hash; "/ref" answers everything right and reports its precision in /v1/models, "/cand"
gets the counting questions wrong and reports nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from glm4v_edge.cli import main
from profiling.vqa_synthetic import synthetic_items

ITEMS = synthetic_items(10, seed=5)


@pytest.fixture(scope="module")
def server():
    answers = {hashlib.sha256(it.png_bytes()).hexdigest(): it for it in ITEMS}
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/ref/v1/models":
                return self._send(
                    200,
                    {
                        "object": "list",
                        "data": [
                            {
                                "id": "glm-4v-9b",
                                "object": "model",
                                "owned_by": "test",
                                "precision": "bf16",
                                "vision_size": 1120,
                            }
                        ],
                    },
                )
            if self.path == "/cand/v1/models":
                return self._send(200, {"object": "list", "data": [{"id": "other-vlm", "object": "model"}]})
            self._send(404, {"error": {"message": "not found"}})

        def do_POST(self):
            if not self.path.endswith("/v1/chat/completions"):
                return self._send(404, {"error": {"message": "not found"}})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append((self.path, body))
            content = body["messages"][0]["content"]
            url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
            assert url.startswith("data:image/png;base64,")
            item = answers[hashlib.sha256(base64.b64decode(url.split(",", 1)[1])).hexdigest()]
            text = item.answers[0]
            if self.path.startswith("/cand") and item.category == "count":
                text = "many"
            self._send(
                200,
                {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text + "."}}
                    ],
                },
            )

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()


def test_base_url_scores_accuracy_and_greedy_match_without_logits(server, tmp_path, capsys):
    base, requests = server
    out = tmp_path / "http"
    rc = main(
        [
            "eval",
            "--base-url",
            f"{base}/ref/v1,{base}/cand/v1",
            "--limit",
            "10",
            "--seed",
            "5",
            "--max-new-tokens",
            "12",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "no full next-token distribution" in err
    ref, cand = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert ref["precision"] == "bf16" and ref["vision_size"] == 1120 and ref["served_model"] == "glm-4v-9b"
    assert cand["precision"] == "unknown" and cand["served_model"] == "other-vlm"
    n_count = sum(it.category == "count" for it in ITEMS)
    assert ref["accuracy"] == 1.0 and ref["greedy_match"] == 1.0 and ref["is_reference"]
    assert cand["accuracy"] == pytest.approx(1 - n_count / 10)
    assert cand["greedy_match"] == pytest.approx(1 - n_count / 10)
    assert cand["kl_mean"] is None and cand["top1_agreement"] is None and "KL" in cand["note"]
    assert len(requests) == 20
    path, body = requests[0]
    assert path == "/ref/v1/chat/completions" and body["model"] == "glm-4v-9b"
    assert body["temperature"] == 0 and body["max_tokens"] == 12
    assert body["messages"][0]["content"][1]["text"].endswith("\nShort Answer.")
    assert "no full next-token distribution" in (out / "results.md").read_text()


def test_unreachable_server_is_a_clear_error(tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before use: nothing listens there
    rc = main(["eval", "--base-url", f"http://127.0.0.1:{port}/v1", "--limit", "2", "--out", str(tmp_path)])
    assert rc == 1
    assert f"cannot reach http://127.0.0.1:{port}/v1/chat/completions" in capsys.readouterr().err


def test_a_base_url_without_v1_is_accepted(server, tmp_path):
    base, _ = server  # as bench-serve: http://host:port and http://host:port/v1 mean the same server
    assert main(["eval", "--base-url", f"{base}/ref", "--limit", "3", "--seed", "5", "--out", str(tmp_path)]) == 0
