"""tiktoken tokenizer, the chat template of docs/MODEL.md §6, literal encoding, UTF-8-safe streaming detokenization."""

from __future__ import annotations

import json
import shutil

import pytest

from glm4v import GLM4Tokenizer, IncrementalDetokenizer, Message, build_prompt
from glm4v.chat_template import TemplateError
from glm4v.text_stream import TextStream
from glm4v.tokenizer import SPECIAL_TOKENS


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return GLM4Tokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def real_id_tok(tiny_dir, tmp_path_factory):
    """The tiny rank file with the special tokens at the released model's ids (151329…151342)."""
    d = tmp_path_factory.mktemp("realids")
    shutil.copy(tiny_dir / "tokenizer.model", d / "tokenizer.model")
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {
        str(151329 + i): {"content": t, "special": True} for i, t in enumerate(SPECIAL_TOKENS)
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return GLM4Tokenizer.from_pretrained(d)


def test_special_ids_come_from_tokenizer_config(tok, tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert tok.token_id("<|begin_of_image|>") == cfg["boi_token_id"]
    assert tok.token_id("<|end_of_image|>") == cfg["eoi_token_id"]
    assert tok.token_id("<|endoftext|>") == cfg["pad_token_id"]
    assert tok.encode("\n") == [198]  # GPT-2 byte order, as in the real rank file


def test_spec_example_text_only_with_real_ids(real_id_tok):
    """[gMASK]<sop><|user|>\\n你好<|assistant|> = [151331, 151333, 151336, 198, <你好>, 151337] (docs/MODEL.md §6.2)."""
    ids = build_prompt(real_id_tok, [Message("user", "你好")]).ids
    assert ids[:4] == [151331, 151333, 151336, 198]
    assert ids[-1] == 151337
    assert real_id_tok.decode(ids[4:-1]) == "你好"


def test_spec_example_single_image_with_real_ids(real_id_tok):
    ids = build_prompt(real_id_tok, [Message("user", "What is it?", has_image=True)]).ids
    assert ids[:7] == [151331, 151333, 151336, 198, 151339, 151329, 151340]  # boi, placeholder, eoi after "\n"
    assert real_id_tok.decode(ids[7:-1]) == "What is it?"  # no newline after <|end_of_image|>
    assert ids[-1] == 151337


def test_multi_turn_and_system(tok):
    t = tok.token_id
    msgs = [
        Message("system", "Be brief."),
        Message("user", "Q1", has_image=True),
        Message("assistant", "A1"),
        Message("user", "Q2"),
    ]
    p = build_prompt(tok, msgs)
    expected = (
        [t("[gMASK]"), t("<sop>")]
        + [t("<|system|>")]
        + tok.encode("\n")
        + tok.encode("Be brief.")
        + [t("<|user|>")]
        + tok.encode("\n")
        + [t("<|begin_of_image|>"), t("<|endoftext|>"), t("<|end_of_image|>")]
        + tok.encode("Q1")
        + [t("<|assistant|>")]
        + tok.encode("\n")
        + tok.encode("A1")
        + [t("<|user|>")]
        + tok.encode("\n")
        + tok.encode("Q2")
        + [t("<|assistant|>")]
    )
    assert p.ids == expected
    assert p.image_message == 1
    assert build_prompt(tok, msgs, add_generation_prompt=False).ids == expected[:-1]


def test_template_rules(tok):
    with pytest.raises(TemplateError, match="second image"):
        build_prompt(tok, [Message("user", "a", has_image=True), Message("user", "b", has_image=True)])
    with pytest.raises(TemplateError, match="unknown role 'tool'"):
        build_prompt(tok, [Message("tool", "x")])
    skipped = build_prompt(tok, [Message("user", ""), Message("user", "hi")]).ids
    assert skipped == build_prompt(tok, [Message("user", "hi")]).ids


def test_special_token_text_is_encoded_literally(tok):
    ids = tok.encode("<|assistant|> [gMASK]")
    assert tok.token_id("<|assistant|>") not in ids and tok.token_id("[gMASK]") not in ids
    assert tok.decode(ids) == "<|assistant|> [gMASK]"


@pytest.mark.parametrize(
    "text", ["Hello, world!", "你好，请描述这张图片。", "mixed 中文 and emoji 🙂🎉 123", "tabs\tand\nnewlines  "]
)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_streaming_detokenizer_never_splits_a_character(tok):
    text = "A🙂B你好é€"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # multi-byte characters are split over several byte tokens in the tiny vocabulary
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some tokens ended mid-character and were held back


def test_detokenizer_skips_special_tokens_and_replaces_invalid_bytes(tok):
    detok = IncrementalDetokenizer(tok)
    assert detok.push(tok.token_id("<|user|>")) == ""
    lone = tok.encode("🙂")[0]  # the first byte token of a 4-byte character
    assert detok.push(lone) == ""
    assert detok.flush() == "\ufffd"


def test_text_stream_holds_back_possible_stop_strings(tok):
    ids = tok.encode("The answer is 42. END of text")
    s = TextStream(tok, stop=["END"])
    out, stopped = [], False
    for i in ids:
        piece, stopped = s.push(i)
        out.append(piece)
        assert "E" not in "".join(out)  # never emits a prefix of the stop string before it is resolved
        if stopped:
            break
    assert stopped and "".join(out) == "The answer is 42. "


def test_text_stream_releases_held_text_when_no_stop_follows(tok):
    s = TextStream(tok, stop=["ENDX"])
    out = "".join(s.push(i)[0] for i in tok.encode("ends with EN"))
    assert out == "ends with "
    assert out + s.finish() == "ends with EN"
