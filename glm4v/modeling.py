"""GLM-4V-9B: the GLM-4 language model with the EVA2-CLIP image splice (docs/MODEL.md §3–§4).

A native ``transformers.PreTrainedModel`` (no ``trust_remote_code``) whose module tree reproduces the checkpoint's
key names (``transformer.encoder.layers.N.self_attention.query_key_value.weight`` ...), so ``from_pretrained``
loads the official folder unchanged and brings ``quantization_config``, ``device_map`` and sharded loading.

The forward pass takes explicit positions and an explicit :class:`~glm4v.kv_cache.KVCache`; the decode loop lives
in :mod:`glm4v.generate`, not in ``GenerationMixin``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .config import ChatGLMConfig
from .kv_cache import CacheStep, KVCache
from .positions import find_image_span, splice_image
from .vision import EVA2CLIPModel, VisionLayer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As the reference: variance in fp32, the product promotes to fp32, cast back at the end.
        dtype = x.dtype
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return (self.weight * x).to(dtype)


class RotaryEmbedding(nn.Module):
    """GPT-J style (interleaved pairs) rotary embedding on the first half of each head ("original_rope")."""

    def __init__(self, rotary_dim: int, base: float):
        super().__init__()
        self.rotary_dim = rotary_dim  # 64 of the 128 head dims
        self.base = base
        # No ``inv_freq`` buffer: the reference stores one its forward never reads, and as a non-persistent buffer
        # it would hold garbage after from_pretrained builds the model on the meta device. The checkpoint key, when
        # present, is ignored on load.

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, S) positions → (B, S, rotary_dim/2, 2) [cos, sin] table.

        Computed in fp32 then cast to the activation dtype when that is 16-bit, as the reference does
        ("mimic complex32"), so bf16/fp16 runs match it bit for bit.
        """
        # 32 frequencies, computed per call as the reference does (it costs nothing next to one matmul).
        theta = 1.0 / (
            self.base
            ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=position_ids.device) / self.rotary_dim)
        )
        angles = position_ids.to(torch.float32)[..., None] * theta  # (B, S, rotary_dim/2)
        cache = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
        if dtype in (torch.float16, torch.bfloat16):
            cache = cache.to(dtype)
        return cache


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x (B, h, S, D), rope (B, S, R/2, 2): rotate pairs (0,1),(2,3),… of the first R dims; the rest pass through."""
    b, h, s, _ = x.shape
    rot_dim = rope.shape[-2] * 2
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    xs = x_rot.reshape(b, h, s, rot_dim // 2, 2)
    rc = rope.view(b, 1, s, rot_dim // 2, 2)
    out = torch.stack(
        [
            xs[..., 0] * rc[..., 0] - xs[..., 1] * rc[..., 1],
            xs[..., 1] * rc[..., 0] + xs[..., 0] * rc[..., 1],
        ],
        dim=-1,
    ).flatten(3)
    return torch.cat((out, x_pass), dim=-1)


class SelfAttention(nn.Module):
    """GQA: 32 query heads share 2 KV groups (query head h uses group h // 16); fused QKV with bias."""

    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.query_key_value = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.add_bias_linear or config.add_qkv_bias
        )
        self.dense = nn.Linear(self.q_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, step: CacheStep | None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.query_key_value(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # (B, 32, S, 128)
        k = k.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, 2, S, 128)
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, rope)
        k = apply_rotary(k, rope)  # rotated before it is cached, as in the reference
        if step is None:
            mask, is_causal = None, s > 1
        else:
            k, v, mask, is_causal = step.update_and_fetch(self.layer_idx, k, v)
        if s == 1:
            # Decode: the 16 query heads of a KV group attend as 16 queries of that one group, so no kernel ever
            # expands K/V to 32 heads (the math fallback for a masked GQA call would copy the whole cache row).
            qg = q.reshape(b, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
            out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, is_causal=False)
            return self.dense(out.reshape(b, 1, self.q_size))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        return self.dense(out.transpose(1, 2).reshape(b, s, self.q_size))


class MLP(nn.Module):
    """SwiGLU with one fused input projection: the first half of ``dense_h_to_4h`` is the gate."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, step: CacheStep | None) -> torch.Tensor:
        h = x + self.self_attention(self.input_layernorm(x), rope, step)
        return h + self.mlp(self.post_attention_layernorm(h))


class GLMTransformer(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, step: CacheStep | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, rope, step)
        return self.final_layernorm(x)


class Embedding(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class ChatGLMModel(nn.Module):
    """``transformer.*`` of the checkpoint: embedding, 40 GLM blocks, LM head and the vision tower."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config.head_dim // 2, config.rope_base)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.vision = EVA2CLIPModel(config)


@dataclass
class GLM4VOutput(ModelOutput):
    """``logits`` (B, S_expanded or ``logits_to_keep``, vocab) and the expanded ``position_ids`` (B, S_expanded)."""

    logits: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None


class ChatGLMForConditionalGeneration(PreTrainedModel):
    config_class = ChatGLMConfig
    config: ChatGLMConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["GLMBlock", "VisionLayer"]
    _keys_to_ignore_on_load_unexpected = [r"transformer\.rotary_pos_emb\.inv_freq"]
    _supports_sdpa = True

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        config.validate_for_model()
        self.transformer = ChatGLMModel(config)
        self.post_init()

    # ---- transformers plumbing ------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.embedding.word_embeddings

    def get_output_embeddings(self) -> nn.Module:
        return self.transformer.output_layer

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Only used for random checkpoints (tests, demo, synthetic profiling); real weights are always loaded.
        std = 0.02
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, EVA2CLIPModel):
            module.boi.normal_(0.0, std)
            module.eoi.normal_(0.0, std)
        if hasattr(module, "cls_embedding"):
            module.cls_embedding.normal_(0.0, std)

    # ---- pieces of the forward pass -------------------------------------------------------------------------
    @property
    def vision(self) -> EVA2CLIPModel:
        return self.transformer.vision

    @property
    def embed_dtype(self) -> torch.dtype:
        return self.transformer.embedding.word_embeddings.weight.dtype

    @property
    def embed_device(self) -> torch.device:
        """The language model's compute device (the final norm's: the input table itself may live in host memory,
        its rows copied over per step)."""
        return self.transformer.encoder.final_layernorm.weight.device

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, N, N) → (B, (N/28)² + 2, H) in the embedding dtype, on the embedding device."""
        return self.image_features_to_lm(self.vision(self.pixels_to_vision(pixel_values)))

    def pixels_to_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.to(self.vision.patch_embedding.proj.weight.device)

    def image_features_to_lm(self, feats: torch.Tensor) -> torch.Tensor:
        # The vision tower may run in another dtype (or device) than the LM; the reference's fp16/bf16 mix-up
        # (GLM-4 #267) cannot happen here.
        return feats.to(self.embed_device, self.embed_dtype)

    def embed(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with each sample's image spliced in; positions expanded to match (docs/MODEL.md §4.5).

        input_ids, position_ids (B, S) → embeds (B, S', H), position_ids (B, S'). With an image every sample must
        hold exactly one ``boi, placeholder, eoi`` triple, so all samples expand by the same amount.
        """
        embeds = self.transformer.embedding(input_ids)
        if pixel_values is None and image_embeds is None:
            return embeds, position_ids
        if image_embeds is None:
            image_embeds = self.encode_images(pixel_values)
        if image_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{image_embeds.shape[0]} images for a batch of {input_ids.shape[0]} sequences")
        rows, pos_rows = [], []
        for i in range(input_ids.shape[0]):
            b = find_image_span(input_ids[i], self.config.boi_token_id, self.config.eoi_token_id)
            if b is None:
                raise ValueError(
                    f"sequence {i} has an image but no <|begin_of_image|> token (id {self.config.boi_token_id})"
                )
            e, p = splice_image(embeds[i], position_ids[i], b, image_embeds[i])
            rows.append(e)
            pos_rows.append(p)
        return torch.stack(rows), torch.stack(pos_rows)

    def forward_embeds(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        step: CacheStep | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """(B, S, H) embeddings at explicit positions (B, S) → logits (B, S or logits_to_keep, vocab)."""
        t = self.transformer
        rope = t.rotary_pos_emb(position_ids, embeds.dtype)
        hidden = t.encoder(embeds, rope, step)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return t.output_layer(hidden)

    def new_cache(self, max_len: int | None = None, max_batch: int = 1, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        return KVCache(
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            max_len or c.seq_length,
            max_batch,
            dtype=dtype or self.embed_dtype,
            device=self.embed_device,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cache_row: int = 0,
        logits_to_keep: int = 0,
        image_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> GLM4VOutput:
        """The reference forward: ``input_ids`` (B, S) in unexpanded coordinates → logits over the expanded sequence.

        ``position_ids`` (B, S), unexpanded, default to ``arange`` (continuing from the cache's next position when a
        cache is given). With ``cache``, rows ``cache_row .. cache_row + B - 1`` are extended in place, so a prefill
        followed by one-token calls gives the same logits as one full forward.
        """
        if kwargs:
            unknown = ", ".join(sorted(kwargs))
            raise TypeError(f"unexpected forward arguments: {unknown}")
        input_ids = input_ids.to(self.embed_device)
        bsz, seqlen = input_ids.shape
        if position_ids is None:
            start = cache.next_positions[cache_row : cache_row + bsz] if cache is not None else [0] * bsz
            position_ids = (
                torch.arange(seqlen, device=input_ids.device)[None, :]
                + torch.tensor(start, device=input_ids.device)[:, None]
            )
            next_positions = [p + seqlen for p in start]  # known on the host: no device sync per step
        else:
            position_ids = position_ids.to(input_ids.device)
            next_positions = None
        embeds, position_ids = self.embed(input_ids, position_ids, pixel_values, image_embeds)
        step = None
        if cache is not None:
            step = CacheStep.build(cache, cache_row, bsz, embeds.shape[1], embeds.device)
        logits = self.forward_embeds(embeds, position_ids, step, logits_to_keep)
        if step is not None:
            if next_positions is None:
                next_positions = (position_ids[:, -1] + 1).tolist()
            step.commit(embeds.shape[1], next_positions)
        return GLM4VOutput(logits=logits, position_ids=position_ids)


__all__ = [
    "ChatGLMForConditionalGeneration",
    "ChatGLMModel",
    "GLM4VOutput",
    "GLMBlock",
    "VisionLayer",
]
