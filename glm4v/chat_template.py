"""GLM-4V chat template (spec §6), producing token ids directly.

    [gMASK] <sop> <|user|> "\\n" [<|begin_of_image|> <|endoftext|> <|end_of_image|>] question <|assistant|>

Each message is ``<|role|>`` + encode(metadata + "\\n") + (the three image tokens if this message carries the
image) + encode(content); there is no end-of-turn token. The generation prompt is a bare ``<|assistant|>``: the
model writes "\\n" and then the answer. One image per conversation, as the model was trained.
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


def build_prompt(
    tokenizer: GLM4Tokenizer, messages: list[Message], add_generation_prompt: bool = True
) -> Prompt:
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
