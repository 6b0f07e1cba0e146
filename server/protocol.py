"""The OpenAI chat-completions wire format as pydantic models: requests in, responses and stream chunks out.

Request models accept unknown fields (``extra="allow"``) and ignore them: clients add fields every month
(``stream_options``, ``user``, ``store``, ``metadata`` …) and a server that 422s on them breaks the official SDK,
LangChain and Dify (openai-agents-python#442, langchainjs#6533). Fields we know but cannot honour (``n > 1``,
``tools``, ``logit_bias`` …) are answered with a clear 400 by :func:`unsupported_features`, never silently dropped.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import BadRequest, ContextLengthExceeded, validation_message

MAX_STOP_STRINGS = 16  # OpenAI allows 4; Continue sends 6+ to self-hosted servers
MAX_STOP_CHARS = 256  # each
# Checked on the raw JSON before pydantic sees it: validating a million empty messages holds the GIL for seconds.
MAX_MESSAGES = 4096
MAX_PARTS_PER_MESSAGE = 64


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageURL(_Lenient):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(_Lenient):
    """One element of a content array; which fields a part needs depends on ``type`` (checked in conversation)."""

    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None  # Ollama's docs show the bare-string form, so clients send it


class ChatMessage(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool | None = False


class ChatCompletionRequest(_Lenient):
    model: str | None = None  # absent or empty = the served model
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)  # 0 = greedy (Dify's slider minimum; OpenAI accepts it)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0 = off
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Lenient):
    """``POST /v1/completions`` (the legacy API LlamaIndex's ``OpenAILike`` and many scripts default to): a raw text
    prompt, continued — no chat template. One prompt per request (a string, a one-element list, or token ids)."""

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False

    include_usage = ChatCompletionRequest.include_usage
    stop_list = ChatCompletionRequest.stop_list

    @property
    def completion_limit(self) -> int | None:
        return self.max_tokens

    def unsupported(self) -> None:
        for name, bad in (
            ("n", (self.n or 1) > 1),
            ("best_of", (self.best_of or 1) > 1),
            ("echo", bool(self.echo)),
            ("logprobs", self.logprobs is not None),
            ("suffix", bool(self.suffix)),
            ("logit_bias", bool(self.logit_bias)),
        ):
            if bad:
                raise BadRequest(f"{name} is not supported on /v1/completions by this server", param=name)
        if len(self.stop_list) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop_list):
            raise BadRequest(f"at most {MAX_STOP_STRINGS} stop strings of {MAX_STOP_CHARS} characters", param="stop")
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int) and len(p) != 1:
            raise BadRequest("send one prompt per request (a string, a one-element list or token ids)", param="prompt")
        if p == [] or p == "":
            raise BadRequest("prompt is empty", param="prompt")


def parse_completion_request(body: bytes, max_text_chars: int | None = None) -> CompletionRequest:
    data = load_json(body)
    if isinstance(data.get("prompt"), str) and max_text_chars is not None and len(data["prompt"]) > max_text_chars:
        raise ContextLengthExceeded(
            f"the prompt holds {len(data['prompt']):,} characters, more than the model's context could hold "
            f"(at most {max_text_chars:,})",
            param="prompt",
        )
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(list(e.errors()))
        raise BadRequest(message, param=param) from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def check_size(data: dict, max_text_chars: int | None) -> None:
    """Bounds on the raw JSON, cheap enough to run before validation: message and part counts, and the characters
    of text against what the context could hold at all (a token covers at most so many characters)."""
    messages = data.get("messages")
    if not isinstance(messages, list):
        return  # validation says what is wrong
    if len(messages) > MAX_MESSAGES:
        raise BadRequest(
            f"messages holds {len(messages):,} messages; at most {MAX_MESSAGES:,} are accepted", param="messages"
        )
    chars = 0
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            if len(content) > MAX_PARTS_PER_MESSAGE:
                raise BadRequest(
                    f"messages.{i}.content holds {len(content):,} parts; at most {MAX_PARTS_PER_MESSAGE} are accepted",
                    param=f"messages.{i}.content",
                )
            chars += sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    if max_text_chars is not None and chars > max_text_chars:
        raise ContextLengthExceeded(
            f"the messages hold {chars:,} characters of text, more than the model's context could hold "
            f"(at most {max_text_chars:,} characters); please shorten them",
            param="messages",
        )


def load_json(body: bytes) -> dict:
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    except ValueError as e:  # NaN/Infinity, or an integer past Python's 4300-digit conversion limit
        raise BadRequest(f"request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def parse_chat_request(body: bytes, max_text_chars: int | None = None) -> ChatCompletionRequest:
    """Raw body → request model; malformed JSON and schema problems become 400s that say what is wrong."""
    data = load_json(body)
    check_size(data, max_text_chars)
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(list(e.errors()))
        raise BadRequest(message, param=param) from None


def unsupported_features(req: ChatCompletionRequest) -> None:
    """400 for options that would otherwise be silently wrong (GLM-4V-9B has no tool calls; one sample per call)."""
    if req.n is not None and req.n > 1:
        raise BadRequest("n > 1 is not supported: send one request per sample", param="n")
    if req.top_logprobs and not req.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    if req.logit_bias:
        raise BadRequest("logit_bias is not supported by this server", param="logit_bias")
    if req.tools or req.functions:
        if req.tool_choice != "none":
            raise BadRequest(
                "GLM-4V-9B does not support tool calls; remove 'tools' (or set tool_choice 'none')", param="tools"
            )
    elif req.tool_choice not in (None, "none", "auto"):
        raise BadRequest("tool_choice names a tool, but GLM-4V-9B does not support tool calls", param="tool_choice")
    if len(req.stop_list) > MAX_STOP_STRINGS:
        raise BadRequest(f"at most {MAX_STOP_STRINGS} stop strings are allowed", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in req.stop_list):
        raise BadRequest(f"a stop string may be at most {MAX_STOP_CHARS} characters", param="stop")


# ---- responses --------------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None  # {"cached_tokens": n}: entries a kept row already held

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details={"cached_tokens": cached_tokens},
        )

    @classmethod
    def of_handle(cls, handle) -> Usage:
        return cls.of(handle.prompt_tokens, handle.completion_tokens, handle.cached_tokens)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None  # {"content": [...], "refusal": None} when asked for
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# ---- /v1/models -------------------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    """One ``/v1/models`` entry: OpenAI's fields, then what an operator needs to trust the setup (docs/SERVER.md)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glm4v-edge"
    root: str
    parent: str | None = None
    max_model_len: int
    precision: str
    vision_precision: str
    dtype: str
    quantization: dict[str, Any] | None
    layers: dict[str, dict[str, int]]
    vision_size: int
    image_tokens: int
    low_detail_vision_size: int
    low_detail_image_tokens: int
    device: str
    weight_bytes: int | None
    num_parameters: int | None
    kv_cache_bytes: int
    vram: dict[str, int] | None
    max_batch_size: int
    max_queue: int
    compile: dict[str, Any] | None  # null without --compile
    offload: dict[str, Any]  # --offload: where each part lives (device/host, precision), resident vs host bytes
    multi_image: str  # --multi-image: which image of a conversation the model sees
    caches: dict[str, Any]  # --prefix-cache, --image-cache-mb: settings and use (engine.prefix_cache)
    cluster: dict[str, Any] | None = None  # serve-cluster: {"replica": id, "replicas_serving": n}; null otherwise
    sampling_defaults: dict[str, float]  # used when a request omits them (the checkpoint's generation_config.json)
    max_tokens_policy: str  # --max-tokens-policy
    notes: list[str]
    demo: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
