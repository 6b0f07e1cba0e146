"""OpenAI chat request → engine request, in one place and built once: the model name, the unsupported options, the
conversation and its image (fetched and preprocessed off the event loop), the one generation prompt, the completion
budget against the context, and the sampling parameters (OpenAI's defaults where the client is silent).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from engine import GenerationRequest
from engine.prefix_cache import image_key
from glm4v import Message, SamplingParams, expanded_length, generation_prompt
from glm4v.chat_template import TemplateError

from .conversation import build_conversation
from .errors import APIError, BadRequest, ContextLengthExceeded, ModelNotFound
from .protocol import ChatCompletionRequest, CompletionRequest, unsupported_features
from .runtime import Runtime
from .structured import grammar_spec, prepare_matcher


@dataclass
class PreparedChat:
    id: str
    created: int
    model: str
    stream: bool
    include_usage: bool
    generation: GenerationRequest
    clamped_from: int | None = None  # max_tokens the client asked for, when --max-tokens-policy clamp lowered it
    kind: str = "chat"  # "chat" (/v1/chat/completions) | "text" (/v1/completions) | "responses"
    response_format: dict | None = None  # as the client sent it (the Responses API echoes it back)

    @property
    def headers(self) -> dict[str, str]:
        """Response headers saying what the server changed: ``x-glm4v-max-tokens-clamped: <asked>-><given>``."""
        if self.clamped_from is None:
            return {}
        return {"x-glm4v-max-tokens-clamped": f"{self.clamped_from}->{self.generation.params.max_new_tokens}"}


def resolve_model(name: str | None, served: list[str]) -> str:
    if not name:
        return served[0]
    if name in served:
        return name
    raise ModelNotFound(
        f"model {name!r} does not exist; this server serves {', '.join(map(repr, served))}", param="model"
    )


def _prompt_ids(tokenizer, messages: list[Message]) -> list[int]:
    try:
        return generation_prompt(tokenizer, messages).ids
    except TemplateError as e:
        raise BadRequest(str(e), param="messages") from None


def _sampling(req: ChatCompletionRequest, max_new_tokens: int, defaults: dict) -> SamplingParams:
    """The checkpoint's ``generation_config.json`` defaults where the client is silent (GLM-4V-9B: temperature 0.8,
    top_p 0.8), as vLLM does; OpenAI's 1.0 / 1.0 when the checkpoint has none. No penalties by default."""
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=defaults.get("temperature", 1.0) if req.temperature is None else req.temperature,
            top_p=defaults.get("top_p", 1.0) if req.top_p is None else req.top_p,
            top_k=max(0, req.top_k or 0),
            repetition_penalty=req.repetition_penalty or 1.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=req.seed,
            stop=req.stop_list,
            ignore_eos=req.ignore_eos,
            logprobs=(req.top_logprobs or 0) if isinstance(req, ChatCompletionRequest) and req.logprobs else None,
        )
    except ValueError as e:
        raise BadRequest(str(e)) from None


def _completion_budget(
    req: ChatCompletionRequest, prompt_tokens: int, max_model_len: int, default: int | None, policy: str
) -> tuple[int, int | None]:
    """(completion budget, the asked max_tokens when it was clamped). Without max_tokens the completion may use the
    rest of the context (or ``--default-max-tokens``); more than fits is clamped (``--max-tokens-policy clamp``, what
    llama.cpp and Ollama users expect) or a 400 (``reject``, OpenAI's behaviour)."""
    room = max_model_len - prompt_tokens
    asked = req.completion_limit
    if asked is None and room >= 1:
        return (room if default is None else min(default, room)), None
    if asked is not None and asked <= room:
        return asked, None
    if asked is not None and room >= 1 and policy == "clamp":
        return room, asked
    wanted = (
        f"{prompt_tokens + asked} tokens ({prompt_tokens} in the messages, {asked} in the completion)"
        if asked is not None
        else f"{prompt_tokens} tokens in the messages, leaving no room for a completion"
    )
    raise ContextLengthExceeded(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested {wanted}. "
        "Please reduce the length of the messages or the completion (an image counts as its embeddings).",
        param="messages",
    )


ID_PREFIX = {"chat": "chatcmpl-", "text": "cmpl-", "responses": "resp_"}


async def prepare(req: ChatCompletionRequest, rt: Runtime, kind: str = "chat") -> PreparedChat:
    """A chat request (or a Responses-API one, ``kind="responses"``, already expressed as chat) → engine request."""
    model = resolve_model(req.model, rt.served_names)
    unsupported_features(req)
    spec = grammar_spec(req.response_format)
    schema_param = "text.format.schema" if kind == "responses" else "response_format.json_schema.schema"
    matcher = await prepare_matcher(rt, spec, schema_param)  # a bad schema fails before any image is fetched
    lm, loop = rt.loaded, asyncio.get_running_loop()
    conv = await loop.run_in_executor(rt.pool, build_conversation, req.messages, rt.settings.multi_image)
    pixel_values = features = key = size = None
    if conv.image is not None:
        size = rt.low_detail_size if conv.image.detail == "low" else lm.vision_size
        try:
            data = await rt.images.load_bytes(conv.image.url)
            # The same bytes at the same vision size were encoded before: skip the decode and the vision tower.
            key = image_key(data, size, lm.spec.vision_precision)
            features = rt.engine.image_cache.get(key)
            if features is None:
                pixel_values = await loop.run_in_executor(rt.pool, rt.images.preprocess, data, lm.image_processor, size)
        except APIError as e:
            e.param = e.param or conv.image.param
            raise
    ids = await loop.run_in_executor(rt.pool, _prompt_ids, lm.tokenizer, conv.messages)
    image_tokens = lm.image_tokens(size) if size is not None else None
    budget, clamped_from = _completion_budget(
        req,
        expanded_length(len(ids), image_tokens),
        rt.engine.max_model_len,
        rt.settings.default_max_tokens,
        rt.settings.max_tokens_policy,
    )
    request_id = f"{ID_PREFIX[kind]}{uuid.uuid4().hex}"
    generation = GenerationRequest(
        ids,
        _sampling(req, budget, rt.sampling_defaults),
        pixel_values,
        request_id,
        matcher=matcher,
        image_key=key,
        image_features=features,
        image_size=size,
    )
    return PreparedChat(
        request_id,
        int(time.time()),
        model,
        bool(req.stream),
        req.include_usage,
        generation,
        clamped_from,
        kind,
        req.response_format,
    )


def _completion_ids(tokenizer, prompt) -> list[int]:
    """A legacy-completions prompt → ids: text is continued as it is, after GLM's ``[gMASK]<sop>`` prefix (no chat
    template); token ids are taken as given (checked against the vocabulary)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return [tokenizer.token_id("[gMASK]"), tokenizer.token_id("<sop>")] + tokenizer.encode(prompt)
    if any(not 0 <= t < tokenizer.vocab_size for t in prompt):
        raise BadRequest(f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
    return list(prompt)


async def prepare_completion(req: CompletionRequest, rt: Runtime) -> PreparedChat:
    """``/v1/completions``: the same engine request, built from a raw prompt."""
    model = resolve_model(req.model, rt.served_names)
    req.unsupported()
    ids = await asyncio.get_running_loop().run_in_executor(rt.pool, _completion_ids, rt.loaded.tokenizer, req.prompt)
    budget, clamped_from = _completion_budget(
        req, len(ids), rt.engine.max_model_len, rt.settings.default_max_tokens, rt.settings.max_tokens_policy
    )
    request_id = f"{ID_PREFIX['text']}{uuid.uuid4().hex}"
    generation = GenerationRequest(ids, _sampling(req, budget, rt.sampling_defaults), None, request_id)
    return PreparedChat(
        request_id, int(time.time()), model, bool(req.stream), req.include_usage, generation, clamped_from, "text"
    )
