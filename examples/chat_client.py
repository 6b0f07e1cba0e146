"""Talk to a glm4v-edge server with plain ``requests`` + JSON: one image, a question, an optional follow-up turn.

    glm4v-edge serve &                                    # the demo model: asks about drawn shapes
    python examples/chat_client.py --image photo.jpg "What's in this image?"
    python examples/chat_client.py --image https://example.com/cat.png --stream "Describe it"
    python examples/chat_client.py --image photo.jpg --follow-up "Is this a spring or a winter photo?" "What's here?"

The same requests as THUDM's ``glm4v_api_request.py`` (which uses the ``openai`` package), without any SDK: the
image travels as a ``data:`` URL (local file) or as its http(s) URL, the answer comes back as JSON or as
server-sent events. Set ``GLM4V_API_KEY`` (or ``--api-key``) when the server requires a key.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import sys

import requests


def image_url(image: str) -> str:
    """A local path becomes a data URL; an http(s)/data/file URL is passed through."""
    if image.split(":", 1)[0] in ("http", "https", "data", "file"):
        return image
    mime = mimetypes.guess_type(image)[0] or "image/jpeg"
    with open(image, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


def build_messages(question: str, image: str | None, follow_up: str | None, earlier_answer: str | None) -> list:
    content: list[dict] = [{"type": "text", "text": question}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": image_url(image)}})
    messages = [{"role": "user", "content": content}]
    if follow_up:
        messages += [{"role": "assistant", "content": earlier_answer or ""}, {"role": "user", "content": follow_up}]
    return messages


def chat(base_url: str, api_key: str | None, payload: dict, stream: bool) -> tuple[str, dict | None]:
    """POST /chat/completions; returns (answer text, usage). Streams the text to stdout as it arrives."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {**payload, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    r = requests.post(
        f"{base_url.rstrip('/')}/chat/completions", json=body, headers=headers, stream=stream, timeout=600
    )
    if r.status_code != 200:
        error = r.json().get("error", {})
        raise SystemExit(f"HTTP {r.status_code} ({error.get('code')}): {error.get('message')}")
    if not stream:
        data = r.json()
        text = data["choices"][0]["message"]["content"]
        print(text)
        print(f"[finish_reason={data['choices'][0]['finish_reason']}]", file=sys.stderr)
        return text, data["usage"]
    parts, usage = [], None
    for line in r.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            raise SystemExit(f"stream failed: {event['error']['message']}")
        usage = event.get("usage") or usage
        for choice in event["choices"]:
            piece = choice["delta"].get("content") or ""
            parts.append(piece)
            print(piece, end="", flush=True)
            if choice["finish_reason"]:
                print(f"\n[finish_reason={choice['finish_reason']}]", file=sys.stderr)
    return "".join(parts), usage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("question")
    p.add_argument("--image", help="image file, or an http(s):// / data: / file:// URL")
    p.add_argument("--follow-up", help="a second user turn, asked after the first answer")
    p.add_argument("--base-url", default=os.environ.get("GLM4V_BASE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("GLM4V_API_KEY"))
    p.add_argument("--model", default="glm-4v-9b")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--max-tokens", type=int, default=256)
    args = p.parse_args(argv)

    sampling = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "temperature": 0.4,
        "top_p": 0.8,
        "presence_penalty": 1.2,
    }
    answer, usage = chat(
        args.base_url,
        args.api_key,
        {**sampling, "messages": build_messages(args.question, args.image, None, None)},
        args.stream,
    )
    if args.follow_up:
        messages = build_messages(args.question, args.image, args.follow_up, answer)
        _, usage = chat(args.base_url, args.api_key, {**sampling, "messages": messages}, args.stream)
    print(f"[usage: {json.dumps(usage)}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
