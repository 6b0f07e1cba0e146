"""Who answers the eval questions: a model loaded here (greedy answers and teacher-forced log-probs), or any
OpenAI-compatible server over plain HTTP (answers only — a chat-completions response carries no full logits)."""

from __future__ import annotations

import base64
import os

from .vqa_sets import Item
from .vqa_synthetic import SUFFIX


class LocalAnswerer:
    """Greedy answers from a :class:`quant.loader.LoadedModel` (its own precision and vision size)."""

    def __init__(self, lm, max_new_tokens: int = 16, suffix: str = SUFFIX):
        self.lm = lm
        self.max_new_tokens = max_new_tokens
        self.suffix = suffix

    def prepare(self, item: Item):
        """(prompt ids, pixels (3, N, N)) for an item, at this model's vision size."""
        from glm4v import Message, generation_prompt

        ids = generation_prompt(self.lm.tokenizer, [Message("user", item.prompt(self.suffix), has_image=True)]).ids
        return ids, self.lm.image_processor(item.open_image())

    def answer(self, item: Item):
        """(text, generated ids incl. a final stop token, prepared inputs) — greedy, so repeatable."""
        import torch

        from glm4v import SamplingParams, expanded_length
        from glm4v.generate import generate_text

        ids, pixels = self.prepare(item)
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0)
        with torch.inference_mode():
            text, out_ids, _ = generate_text(
                self.lm.model,
                self.lm.tokenizer,
                ids,
                pixels,
                params,
                max_len=expanded_length(len(ids), self.lm.image_tokens()) + self.max_new_tokens + 4,
            )
        return text.strip(), out_ids, (ids, pixels)

    def logprobs(self, prepared, answer_ids: list[int]):
        from .fidelity import teacher_forced_logprobs

        ids, pixels = prepared
        return teacher_forced_logprobs(self.lm.model, ids, pixels, answer_ids)


class HttpError(RuntimeError):
    pass


class HttpAnswerer:
    """Plain OpenAI ``POST {base_url}/chat/completions`` with the image as a PNG data URL, temperature 0.

    ``base_url`` is what the OpenAI client takes (``http://host:8000/v1``; without ``/v1`` it is added). The model
    name is ``model`` or the first id ``GET {base_url}/models`` lists; precision fields that server reports there are
    picked up.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        max_tokens: int = 16,
        timeout_s: float = 300.0,
        api_key: str | None = None,
        suffix: str = SUFFIX,
    ):
        import httpx

        # With or without /v1, as bench-serve: http://host:8000 and http://host:8000/v1 mean the same server.
        self.base_url = base_url.rstrip("/") if base_url.rstrip("/").endswith("/v1") else base_url.rstrip("/") + "/v1"
        self.max_tokens = max_tokens
        self.suffix = suffix
        key = api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("GLM4V_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers)
        self.model_info = self._model_info(model)
        self.model = self.model_info.get("id") or model

    def _request(self, method: str, path: str, **kw) -> dict:
        import httpx

        url = f"{self.base_url}{path}"
        try:
            r = self.client.request(method, url, **kw)
        except httpx.HTTPError as e:
            raise HttpError(f"cannot reach {url}: {e}") from None
        if r.status_code >= 400:
            raise HttpError(f"{url} returned HTTP {r.status_code}: {r.text[:300]}")
        try:
            return r.json()
        except ValueError:
            raise HttpError(f"{url} did not return JSON: {r.text[:200]!r}") from None

    def _model_info(self, model: str | None) -> dict:
        try:
            data = self._request("GET", "/models").get("data") or []
        except HttpError:
            data = []  # /v1/models is optional for our purpose; the chat call will fail loudly if needed
        for m in data:
            if model is None or m.get("id") == model:
                return m
        return {"id": model} if model else {}

    def describe(self) -> dict:
        """precision / vision_precision / vision_size the server reports in /v1/models (top level or one level
        down), else "unknown" — so a report can place the server's row."""
        found = {}
        for src in [self.model_info] + [v for v in self.model_info.values() if isinstance(v, dict)]:
            for k in ("precision", "vision_precision", "vision_size"):
                if k in src and k not in found:
                    found[k] = src[k]
        return {
            "precision": found.get("precision", "unknown"),
            "vision_precision": found.get("vision_precision"),
            "vision_size": found.get("vision_size"),
            "served_model": self.model,
            "base_url": self.base_url,
        }

    def answer(self, item: Item) -> str:
        data_url = "data:image/png;base64," + base64.b64encode(item.png_bytes()).decode()
        body = {
            "model": self.model or "default",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url}},
                        {"type": "text", "text": item.prompt(self.suffix)},
                    ],
                }
            ],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        resp = self._request("POST", "/chat/completions", json=body)
        try:
            return (resp["choices"][0]["message"]["content"] or "").strip()
        except (KeyError, IndexError, TypeError):
            raise HttpError(f"{self.base_url}/chat/completions: unexpected response {str(resp)[:200]}") from None

    def close(self) -> None:
        self.client.close()
