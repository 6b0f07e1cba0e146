"""Random GLM-4V checkpoints in the exact official folder layout, for tests and benchmarks; the shipped demo model.

``write_checkpoint(dir)`` writes what a user downloads from ``THUDM/glm-4v-9b`` — ``config.json`` with every field
of the official file, safetensors with the official key names (sharded with ``model.safetensors.index.json`` if
asked), ``tokenizer.model`` (a small tiktoken rank file trained here by byte-level BPE), ``tokenizer_config.json``
with the real special tokens and ``generation_config.json`` — only smaller and with random weights. The vocabulary
is small, so every special-token id differs from the real one: code that hard-codes an id fails on it.
Deterministic for a given seed.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .tokenizer import SPECIAL_TOKENS, write_rank_file

PRESETS = {
    # Every dimension a multiple of 32 (bitsandbytes' 4-bit CPU kernels need out_features % 32 == 0).
    "tiny": dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        kv_channels=16,
        multi_query_group_num=2,
        ffn_hidden_size=128,
        vision_hidden_size=64,
        vision_heads=2,
        vision_intermediate_size=128,
        vision_layers=2,
        image_size=112,
        n_ranks=1000,
    ),
    # Big enough that matmuls dominate on a CPU: for benchmarks (docs/PERFORMANCE.md, docs/PROFILING.md).
    "mid": dict(
        num_layers=8,
        hidden_size=1024,
        num_attention_heads=8,
        kv_channels=128,
        multi_query_group_num=2,
        ffn_hidden_size=2816,
        vision_hidden_size=512,
        vision_heads=8,
        vision_intermediate_size=2048,
        vision_layers=4,
        image_size=448,
        n_ranks=4000,
    ),
}

# Text the tiny BPE vocabulary is trained on: English, Chinese, digits, code-ish punctuation.
_CORPUS = """
The quick brown fox jumps over the lazy dog. What is in this image? Describe the picture in one sentence.
This is a photo of a red circle on a white background. There are three blue squares and two green triangles.
The text in the image says HELLO WORLD. The number shown is 42. How many objects are there? Answer with one word.
A cat is sitting on the table next to a cup of coffee. The sky is blue and the grass is green.
你好，请描述这张图片。图片中有一只猫。这是一个红色的圆。图中有三个蓝色的正方形。请用一句话回答。
What colour is the shape? red green blue yellow black white orange purple circle square triangle star.
Question: what is written in the picture? Answer: the word is edge. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024.
def main(): return {"key": [1, 2, 3]}  # comment
Short Answer. Yes. No. I don't know. It's a dog's toy, isn't it? They're here; we've seen it; you'll see.
"""


def gpt2_byte_order() -> list[int]:
    """The 256 byte values in GPT-2/cl100k rank order (printable first), which puts "\\n" at rank 198."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    return bs + [b for b in range(256) if b not in bs]


def train_ranks(n_ranks: int, corpus: str = _CORPUS) -> dict[bytes, int]:
    """Byte-level BPE trained on ``corpus`` with the GLM-4 split regex: a valid tiktoken rank table."""
    import regex

    from .tokenizer import PAT_STR

    ranks = {bytes([b]): i for i, b in enumerate(gpt2_byte_order())}
    words = collections.Counter(m.encode() for m in regex.findall(PAT_STR, corpus * 3))
    seqs = {w: [bytes([c]) for c in w] for w in words}
    while len(ranks) < n_ranks:
        pairs = collections.Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:], strict=False):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        for w, seq in seqs.items():
            i, out = 0, []
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    # Fill the rest with two-letter merges (valid BPE entries: both halves are bytes), so random text stays readable.
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    pairs = [a + b for a in " " + letters for b in letters]
    for piece in pairs + [p + c for p in pairs for c in letters]:  # "ab" then "ab"+"c": each a valid merge
        if len(ranks) >= n_ranks:
            break
        ranks.setdefault(piece.encode(), len(ranks))
    if len(ranks) < n_ranks:
        raise ValueError(f"cannot build {n_ranks} ranks from the built-in corpus")
    return ranks


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def make_config(preset: str = "tiny", image_size: int | None = None, **overrides) -> dict:
    """A ``config.json`` dict with every field of the official file (docs/MODEL.md §1), at the preset's sizes."""
    p = dict(PRESETS[preset])
    p.update({k: v for k, v in overrides.items() if v is not None})
    if image_size is not None:
        p["image_size"] = image_size
    n_special = len(SPECIAL_TOKENS)
    first_special = p["n_ranks"]
    ids = {t: first_special + i for i, t in enumerate(SPECIAL_TOKENS)}
    patch = 14
    grid = p["image_size"] // patch
    return {
        "_name_or_path": f"glm4v-edge/{preset}-random",
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "architectures": ["ChatGLMModel"],
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "attn_implementation": "sdpa",
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
        },
        "bias_dropout_fusion": True,
        "boi_token_id": ids["<|begin_of_image|>"],
        "classifier_dropout": None,
        "eoi_token_id": ids["<|end_of_image|>"],
        "eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]],
        "ffn_hidden_size": p["ffn_hidden_size"],
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": p["hidden_size"],
        "kv_channels": p["kv_channels"],
        "layernorm_epsilon": 1.5625e-07,
        "model_type": "chatglm",
        "multi_query_attention": True,
        "multi_query_group_num": p["multi_query_group_num"],
        "num_attention_heads": p["num_attention_heads"],
        "num_layers": p["num_layers"],
        "original_rope": True,
        "pad_token_id": ids["<|endoftext|>"],
        "padded_vocab_size": _round_up(first_special + n_special, 32),
        "post_layer_norm": True,
        "pre_seq_len": None,
        "prefix_projection": False,
        "rmsnorm": True,
        "seq_length": 2048,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.44.0",
        "use_cache": True,
        "vision_config": {
            "dropout_prob": 0.0,
            "hidden_act": "gelu",
            "in_channels": 3,
            "num_hidden_layers": p["vision_layers"],
            "hidden_size": p["vision_hidden_size"],
            "patch_size": patch,
            "num_heads": p["vision_heads"],
            "intermediate_size": p["vision_intermediate_size"],
            "layer_norm_eps": 1e-06,
            "num_positions": grid * grid + 1,
            "image_size": p["image_size"],
            "scaling_factor": 8,
        },
    }


def tokenizer_config(config: dict) -> dict:
    first = config["pad_token_id"]
    return {
        "added_tokens_decoder": {
            str(first + i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": list(SPECIAL_TOKENS),
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "image_size": config["vision_config"]["image_size"],
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "ChatGLM4Tokenizer",
    }


def random_state_dict(config: dict, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random weights with the official names and shapes, built through the real model class."""
    from .config import ChatGLMConfig
    from .modeling import ChatGLMForConditionalGeneration

    torch.manual_seed(seed)
    cfg = ChatGLMConfig(**{k: v for k, v in config.items() if k not in ("auto_map", "architectures")})
    model = ChatGLMForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in model.state_dict().items():
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith("norm1.weight"):
            w = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        elif name.endswith(".bias"):
            w = 0.02 * torch.randn(t.shape, generator=g)
        elif t.dim() >= 2:
            fan_in = t[0].numel() if "word_embeddings" not in name and "position_embedding" not in name else 1
            w = torch.randn(t.shape, generator=g) / fan_in**0.5
            if "output_layer" in name:
                w = w * 4.0  # peaky next-token distributions, so greedy/top-1 comparisons mean something
        else:
            w = 0.5 * torch.randn(t.shape, generator=g)
        sd[name] = w.to(dtype).contiguous()
    # The reference stores this persistent buffer; our loader ignores it. Keep it to exercise that path.
    sd["transformer.rotary_pos_emb.inv_freq"] = rotary_inv_freq(config, dtype)
    return sd


def write_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny",
    image_size: int | None = None,
    seed: int = 0,
    shards: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    **overrides,
) -> Path:
    config = make_config(preset, image_size, **overrides)
    ranks = train_ranks(config["pad_token_id"])  # the special tokens start right after the ranks
    return write_model_folder(out_dir, config, ranks, random_state_dict(config, seed, dtype), shards)


def rotary_inv_freq(config: dict, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The persistent buffer the reference stores as ``transformer.rotary_pos_emb.inv_freq`` (our loader ignores it)."""
    kv = config["kv_channels"]
    rd = kv // 2
    return (1.0 / (10000 ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))).to(dtype)


def write_model_folder(
    out_dir: str | Path, config: dict, ranks: dict[bytes, int], sd: dict[str, torch.Tensor], shards: int = 1
) -> Path:
    """config, generation config, tokenizer files and safetensors (sharded with an index if asked), official layout."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "do_sample": True,
                "eos_token_id": config["eos_token_id"],
                "max_length": config["seq_length"],
                "pad_token_id": config["pad_token_id"],
                "temperature": 0.8,
                "top_p": 0.8,
                "transformers_version": "4.44.0",
            },
            indent=2,
        )
        + "\n"
    )
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(config), indent=2) + "\n")
    write_rank_file(out / "tokenizer.model", ranks)

    meta = {"format": "pt"}
    if shards <= 1:
        save_file(sd, str(out / "model.safetensors"), metadata=meta)
    else:
        names = list(sd)
        per = -(-len(names) // shards)
        weight_map, total = {}, 0
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: sd[n] for n in names[i * per : (i + 1) * per]}
            save_file(part, str(out / fname), metadata=meta)
            for n, t in part.items():
                weight_map[n] = fname
                total += t.numel() * t.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"


def demo_model_dir() -> Path:
    """The shipped demo model: a small GLM-4V-architecture checkpoint trained by ``tools/train_demo.py`` (docs/DEMO.md)
    on drawn visual questions; what ``serve``/``chat`` run without ``--model``."""
    if not (DEMO_MODEL_DIR / "config.json").is_file() or not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the demo model is missing from {DEMO_MODEL_DIR} (an install without package data?): "
            "reinstall glm4v-edge, or pass --model"
        )
    return DEMO_MODEL_DIR
