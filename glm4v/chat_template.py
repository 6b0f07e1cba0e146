"""GLM-4V chat template (docs/MODEL.md §6), producing token ids directly.

    [gMASK] <sop> <|user|> "\\n" [<|begin_of_image|> <|endoftext|> <|end_of_image|>] question <|assistant|>

Each message is ``<|role|>`` + encode(metadata + "\\n") + (the three image tokens if this message carries the
image) + encode(content); there is no end-of-turn token. The reference's generation prompt is a bare
``<|assistant|>``, after which the model always writes "\\n" (the end of the reply's empty metadata line) and
then the answer. :func:`generation_prompt` — what this project sends from every front door (server, ``chat``,
``eval``, ``profile``, the benchmarks) — puts that newline in the prompt, so it never starts the answer and
``stop: ["\\n"]`` means "one line". One image per conversation, as the model was trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .tokenizer import GLM4Tokenizer

ROLES = ("system", "user", "assistant", "observation")


@dataclass
class Message:
    role: str
    content: str = ""
    has_image: bool = False
    metadata: str = ""


@dataclass
class Prompt:
    ids: list[int]
    image_message: int | None = None  # index of the message that carries the image
    roles: list[str] = field(default_factory=list)

    @property
    def has_image(self) -> bool:
        return self.image_message is not None


class TemplateError(ValueError):
    pass


def build_prompt(tokenizer: GLM4Tokenizer, messages: list[Message], add_generation_prompt: bool = True) -> Prompt:
    tok = tokenizer.token_id
    ids = [tok("[gMASK]"), tok("<sop>")]
    image_message = None
    roles = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise TemplateError(f"message {i}: unknown role {m.role!r} (expected one of {', '.join(ROLES)})")
        if m.has_image:
            if image_message is not None:
                raise TemplateError(
                    f"message {i} carries a second image; GLM-4V-9B understands one image per conversation"
                )
            image_message = i
        if not m.content and not m.has_image:
            continue  # the reference skips empty messages
        ids.append(tok(f"<|{m.role}|>"))
        ids += tokenizer.encode(m.metadata + "\n")
        if m.has_image:
            ids += [tok("<|begin_of_image|>"), tok("<|endoftext|>"), tok("<|end_of_image|>")]
        ids += tokenizer.encode(m.content)
        roles.append(m.role)
    if add_generation_prompt:
        ids.append(tok("<|assistant|>"))
    return Prompt(ids=ids, image_message=image_message, roles=roles)


def generation_suffix(tokenizer: GLM4Tokenizer) -> list[int]:
    """The ids that end every generation prompt: ``<|assistant|>`` and the newline the model would write first."""
    return [tokenizer.token_id("<|assistant|>")] + tokenizer.encode("\n")


def generation_prompt(tokenizer: GLM4Tokenizer, messages: list[Message]) -> Prompt:
    """The one prompt for generation, whatever the front door: the template, then :func:`generation_suffix`."""
    prompt = build_prompt(tokenizer, messages, add_generation_prompt=False)
    prompt.ids += generation_suffix(tokenizer)
    return prompt


IMAGE_PLACEHOLDERS = 3  # <|begin_of_image|> <|endoftext|> <|end_of_image|>


def expanded_length(n_ids: int, image_tokens: int | None) -> int:
    """Sequence entries (KV-cache slots, logits rows) of a prompt of ``n_ids`` ids once its image is spliced in:
    the three placeholders become ``image_tokens`` embeddings (boi + patches + eoi; 1602 at 1120 px). ``None`` or
    0 = no image."""
    return n_ids + (image_tokens - IMAGE_PLACEHOLDERS if image_tokens else 0)
