"""Ask the demo model about a picture it has never seen: draw one, send it, print the answer.

    make serve &                                 # no --model: the shipped demo model (docs/DEMO.md)
    python examples/demo_request.py              # a red circle → "It is red."
    python examples/demo_request.py --shape triangle --colour blue   # → "It is blue."
    python examples/demo_request.py --shape square --question "What shape is this?"   # → "It is a square."
    python examples/demo_request.py --image my_drawing.png --question "How many squares are there?"

Standard library + Pillow only; the request is the OpenAI chat-completions shape any client sends.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import urllib.request

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 150, 60), "blue": (30, 70, 220), "yellow": (240, 200, 20)}


def draw(shape: str, colour: str) -> bytes:
    im = Image.new("RGB", (400, 300), "white")
    d = ImageDraw.Draw(im)
    box, fill = (130, 70, 270, 210), COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(200, 70), (270, 210), (130, 210)], fill=fill)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default=os.environ.get("GLM4V_BASE_URL", "http://127.0.0.1:8000/v1"))
    ap.add_argument("--image", help="a picture to send instead of the drawn one")
    ap.add_argument("--shape", default="circle", choices=["circle", "square", "triangle"])
    ap.add_argument("--colour", default="red", choices=sorted(COLOURS))
    ap.add_argument("--question", default=None, help='default: "What colour is the <shape>?"')
    args = ap.parse_args()
    data = open(args.image, "rb").read() if args.image else draw(args.shape, args.colour)  # noqa: SIM115
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    question = args.question or f"What colour is the {args.shape}?"
    body = {
        "model": "glm-4v-9b",
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}],
            }
        ],
    }
    req = urllib.request.Request(
        args.base_url.rstrip("/") + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": "Bearer " + os.environ.get("GLM4V_API_KEY", "none"),
        },
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        print(json.load(resp)["choices"][0]["message"]["content"])


if __name__ == "__main__":
    main()
