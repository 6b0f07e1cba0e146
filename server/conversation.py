"""OpenAI ``messages`` → GLM-4V messages plus the conversation's one image.

Every role may carry a string or a content-part array (Open WebUI #13500, go-proxy-bingai#448 broke on servers that
expected strings). Text parts of one message are joined with newlines. ``developer`` (the newer OpenAI name) is a
system message. GLM-4V-9B was trained with one image per conversation (docs/MODEL.md §6.2), so a second image is a
400 under
the default ``--multi-image reject``; ``first`` keeps the first image and drops the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from glm4v import Message

from .errors import BadRequest
from .protocol import ChatMessage, ImageURL

ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "observation": "observation",
}


@dataclass
class ImageRef:
    url: str
    detail: str  # "auto" | "low" | "high"
    param: str  # where it came from, for error messages: messages.0.content.1


@dataclass
class Conversation:
    messages: list[Message]
    image: ImageRef | None
    dropped_images: int = 0


def _image_ref(image_url: ImageURL | str | None, param: str) -> ImageRef:
    if image_url is None:
        raise BadRequest("an image_url part needs an 'image_url' field", param=param)
    if isinstance(image_url, str):
        url, detail = image_url, "auto"
    else:
        url, detail = image_url.url, image_url.detail or "auto"
    if not url.strip():
        raise BadRequest("image_url.url is empty", param=param)
    return ImageRef(url=url, detail=detail, param=param)


def build_conversation(messages: list[ChatMessage], multi_image: str = "newest") -> Conversation:
    """OpenAI messages → GLM-4V messages and the one image the model sees.

    ``multi_image``: ``newest`` (default) — chat UIs resend the whole history, so the newest image is the one the
    model sees, in the message that sent it; older image parts are dropped (their text is kept). ``first`` keeps the
    first instead; ``reject`` answers 400 to a second image. Two images inside one message are a 400 under every
    policy: the model cannot compare images, and silently dropping one of them would answer a different question.
    """
    out: list[Message] = []
    refs: list[tuple[int, ImageRef]] = []  # (message index, image) in order
    for i, m in enumerate(messages):
        role = ROLES.get(m.role)
        if role is None:
            hint = " (GLM-4V-9B has no tool calling)" if m.role in ("tool", "function") else ""
            raise BadRequest(
                f"messages.{i}: role {m.role!r} is not supported{hint}; use system, user or assistant",
                param=f"messages.{i}.role",
            )
        texts: list[str] = []
        in_message = 0
        if isinstance(m.content, str):
            texts.append(m.content)
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            param = f"messages.{i}.content.{j}"
            if part.type == "text":
                if part.text is None:
                    raise BadRequest("a text part needs a 'text' field", param=param)
                texts.append(part.text)
            elif part.type == "image_url":
                ref = _image_ref(part.image_url, param)
                in_message += 1
                if in_message > 1:
                    raise BadRequest(
                        f"{param}: this message holds more than one image; GLM-4V-9B sees one image at a time and "
                        "cannot compare images — send one image per message",
                        param=param,
                        code="too_many_images",
                    )
                if refs and multi_image == "reject":
                    raise BadRequest(
                        f"{param}: GLM-4V-9B understands one image per conversation and this request holds more; "
                        "send one image per conversation (the server's --multi-image policy is 'reject')",
                        param=param,
                        code="too_many_images",
                    )
                refs.append((i, ref))
            else:
                raise BadRequest(
                    f"{param}: content part type {part.type!r} is not supported (use text or image_url)",
                    param=param,
                )
        out.append(Message(role, "\n".join(texts)))
    chosen = (refs[0] if multi_image == "first" else refs[-1]) if refs else None
    if chosen is not None:
        out[chosen[0]].has_image = True
    if not any(m.content or m.has_image for m in out):
        raise BadRequest("every message is empty", param="messages")
    return Conversation(messages=out, image=chosen[1] if chosen else None, dropped_images=max(0, len(refs) - 1))
