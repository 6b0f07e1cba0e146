"""GLM-4V-9B configuration, read from the official ``config.json`` (``model_type: "chatglm"``).

Field names are the checkpoint's own (``num_layers``, ``kv_channels``, ``multi_query_group_num``, ...), so the
official file loads unchanged and a config we write is one the reference remote code would also accept.
The vision tower's settings stay a plain nested dict in the file (the reference reads it with
``argparse.Namespace``); :attr:`ChatGLMConfig.vision` gives a typed view of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedConfig


@dataclass(frozen=True)
class VisionConfig:
    """EVA2-CLIP vision tower settings (``config.json`` → ``vision_config``)."""

    hidden_size: int = 1792
    intermediate_size: int = 15360
    num_hidden_layers: int = 63
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 1120
    in_channels: int = 3
    num_positions: int = 6401
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    dropout_prob: float = 0.0
    scaling_factor: float = 8.0

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per side of the position table the checkpoint was trained with (80 for 1120/14)."""
        return self.image_size // self.patch_size

    def image_tokens(self, image_size: int | None = None) -> int:
        """LM embeddings one image occupies at ``image_size``: the 2×2-merged patch grid + boi + eoi."""
        side = (image_size or self.image_size) // self.patch_size // 2
        return side * side + 2


class ChatGLMConfig(PreTrainedConfig):
    """The official GLM-4V-9B ``config.json``; defaults are the released model's values (docs/MODEL.md §1)."""

    model_type = "chatglm"
    keys_to_ignore_at_inference = ["past_key_values"]

    num_layers: int = 40
    padded_vocab_size: int = 151552
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    seq_length: int = 8192
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float | None = None
    layernorm_epsilon: float = 1.5625e-07
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = True
    bias_dropout_fusion: bool = True
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    apply_query_key_layer_scaling: bool = True
    attention_softmax_in_fp32: bool = True
    fp32_residual_connection: bool = False
    original_rope: bool = True
    rope_ratio: float = 1.0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    use_cache: bool = True
    tie_word_embeddings: bool = False
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = 151329
    boi_token_id: int | None = 151339
    eoi_token_id: int | None = 151340
    vision_config: dict | None = None

    def __post_init__(self, **kwargs):
        if self.eos_token_id is None:
            self.eos_token_id = [151329, 151336, 151338]
        if self.vision_config is None:
            self.vision_config = dict(VisionConfig().__dict__)
        super().__post_init__(**kwargs)

    # ---- typed views used by the network -------------------------------------------------------------------
    @property
    def vision(self) -> VisionConfig:
        return VisionConfig.from_dict(self.vision_config)

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def num_kv_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def rope_base(self) -> float:
        return 10000.0 * self.rope_ratio

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [e] if isinstance(e, int) else list(e or [])

    # transformers' generic code (caches, device maps, memory estimates) asks for these standard names.
    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers

    @property
    def vocab_size(self) -> int:
        return self.padded_vocab_size

    def validate_for_model(self) -> None:
        """Reject configs the network cannot run, with a message naming the field (not a shape error later)."""
        problems = []
        if self.hidden_size != self.num_attention_heads * self.kv_channels:
            problems.append(
                f"hidden_size ({self.hidden_size}) != num_attention_heads ({self.num_attention_heads}) × kv_channels "
                f"({self.kv_channels})"
            )
        if self.num_attention_heads % self.num_kv_heads:
            problems.append(
                f"num_attention_heads {self.num_attention_heads} not divisible by KV groups {self.num_kv_heads}"
            )
        if self.kv_channels % 4:
            problems.append(f"kv_channels {self.kv_channels} must be divisible by 4 (RoPE on half the head, in pairs)")
        if not self.original_rope:
            problems.append(
                "original_rope=false (the non-interleaved ChatGLM2 RoPE) is not GLM-4V and is not supported"
            )
        if not self.rmsnorm or not self.post_layer_norm or self.apply_residual_connection_post_layernorm:
            problems.append(
                "only rmsnorm=true, post_layer_norm=true, apply_residual_connection_post_layernorm=false "
                "(the GLM-4V-9B layout) are supported"
            )
        if self.pre_seq_len:
            problems.append("prefix tuning (pre_seq_len) is not supported")
        v = self.vision
        if v.image_size % (2 * v.patch_size):
            problems.append(f"vision image_size {v.image_size} must be a multiple of 2×patch_size ({2 * v.patch_size})")
        if v.num_positions != v.grid_size**2 + 1:
            problems.append(
                f"vision num_positions {v.num_positions} != (image_size/patch_size)²+1 = {v.grid_size**2 + 1}"
            )
        if v.hidden_size % v.num_heads:
            problems.append(f"vision hidden_size {v.hidden_size} not divisible by num_heads {v.num_heads}")
        for name in ("boi_token_id", "eoi_token_id", "pad_token_id"):
            if getattr(self, name) is None:
                problems.append(f"{name} is missing")
        if problems:
            raise ValueError("unsupported GLM-4V config.json: " + "; ".join(problems))
