"""GLM-4 tokenizer: the ``tokenizer.model`` tiktoken rank file plus the special tokens of ``tokenizer_config.json``.

``tokenizer.model`` holds one ``<base64 token bytes> <rank>`` pair per line (byte-level BPE, GPT-2 byte order, the
cl100k split regex). Special tokens (``<|user|>``, ``[gMASK]`` ...) are not in that file: their ids come from
``added_tokens_decoder`` in ``tokenizer_config.json``. Nothing here hard-codes an id.

Text is always encoded *literally*: a user who types ``<|assistant|>`` gets the characters, never the control
token, so message text cannot forge turns of the conversation.
"""

from __future__ import annotations

import base64
import codecs
import json
from pathlib import Path

import tiktoken

# cl100k's split regex, which GLM-4 uses unchanged (docs/MODEL.md §7).
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)


def read_rank_file(path: str | Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a tiktoken rank line ({e})") from None
    return ranks


def write_rank_file(path: str | Path, ranks: dict[bytes, int]) -> None:
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


class GLM4Tokenizer:
    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], image_size: int | None = None):
        missing = [t for t in SPECIAL_TOKENS[:12] if t not in special_tokens]
        if missing:
            raise ValueError(f"tokenizer_config.json lacks special tokens {missing}")
        self.special_tokens = dict(special_tokens)
        self.special_ids = set(special_tokens.values())
        self._id_to_special = {i: t for t, i in special_tokens.items()}
        self.encoding = tiktoken.Encoding(
            name="glm4", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.n_ranks = len(ranks)
        # The most bytes one token covers (512 in GLM-4's vocabulary: a run of spaces): any text of C characters
        # needs at least C / max_token_bytes tokens, a bound the server checks before tokenizing anything.
        self.max_token_bytes = max(map(len, ranks), default=1)
        self.image_size = image_size

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "GLM4Tokenizer":
        model_dir = Path(model_dir)
        rank_path, cfg_path = model_dir / "tokenizer.model", model_dir / "tokenizer_config.json"
        for p in (rank_path, cfg_path):
            if not p.is_file():
                raise FileNotFoundError(f"{model_dir} has no {p.name}: is this a GLM-4V-9B checkpoint folder?")
        cfg = json.loads(cfg_path.read_text())
        decoder = cfg.get("added_tokens_decoder") or {}
        special = {v["content"]: int(k) for k, v in decoder.items()}
        return cls(read_rank_file(rank_path), special, cfg.get("image_size"))

    # ---- ids ------------------------------------------------------------------------------------------------
    def token_id(self, token: str) -> int:
        return self.special_tokens[token]

    @property
    def vocab_size(self) -> int:
        return max(self.n_ranks - 1, *self.special_ids) + 1

    def encode(self, text: str) -> list[int]:
        """Plain text → ids, special-token text encoded as ordinary characters; no prefix added."""
        if not text:
            return []
        return self.encoding.encode(text, allowed_special=set(), disallowed_special=())

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._id_to_special:
            return self._id_to_special[token_id].encode()
        if token_id >= self.n_ranks:
            return b""  # an unused id (embedding padding): nothing to print
        return self.encoding.decode_single_token_bytes(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces that never split a UTF-8 character.

    A token can end in the middle of a multi-byte character (byte-level BPE); its bytes are held back until the
    character is complete. Invalid byte sequences become U+FFFD, as in the reference's ``errors="replace"``.
    """

    def __init__(self, tokenizer: GLM4Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self.skip_special_tokens and self.tokenizer.is_special(token_id):
            return ""
        return self._decoder.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
