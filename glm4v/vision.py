"""EVA2-CLIP vision tower and GLU projector of GLM-4V-9B (docs/MODEL.md §4.1–4.4).

Module and parameter names follow the checkpoint (``transformer.vision.*``) so the official safetensors load
unchanged. Two quirks of the reference are kept on purpose:

* the ViT LayerNorms are applied to each branch *output*, not its input (``input_layernorm`` normalises the
  attention output, ``post_attention_layernorm`` the MLP output) — the names are the reference's, the order is too;
* the projected features (boi and eoi included) are divided by ``scaling_factor`` (8) before entering the LM.

Running at a resolution other than the trained one (``image_size``, 1120) resamples the learned position table:
the CLS row is kept and the 80×80 patch grid is bicubically interpolated in float32. At the trained size the
stored table is used as-is, so the output is bit-identical to the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ChatGLMConfig, VisionConfig


def resample_position_table(table: torch.Tensor, old_grid: int, new_grid: int) -> torch.Tensor:
    """[1 + old_grid², C] → [1 + new_grid², C]; CLS row kept, grid resampled bicubically in fp32."""
    if new_grid == old_grid:
        return table
    cls_row, grid = table[:1], table[1:]
    c = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid, old_grid, c).permute(0, 3, 1, 2)  # (1, C, g, g)
    grid = F.interpolate(
        grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=new_grid < old_grid
    )
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, c)
    return torch.cat([cls_row.float(), grid], dim=0).to(table.dtype)


class PatchEmbedding(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(vc.in_channels, vc.hidden_size, kernel_size=vc.patch_size, stride=vc.patch_size)
        self.cls_embedding = nn.Parameter(torch.zeros(1, vc.hidden_size))
        self.position_embedding = nn.Embedding(vc.num_positions, vc.hidden_size)
        self.trained_grid = vc.grid_size
        # Resampled position tables, one per grid size actually used; derived data, never saved.
        self._resampled: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def position_table(self, grid: int) -> torch.Tensor:
        weight = self.position_embedding.weight
        if grid == self.trained_grid:
            return weight
        key = (grid, weight.dtype, weight.device)
        if key not in self._resampled:
            with torch.no_grad():
                self._resampled[key] = resample_position_table(weight.detach(), self.trained_grid, grid)
        return self._resampled[key]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (B, 3, N, N), already normalised
        x = self.proj(images.to(self.proj.weight.dtype))  # (B, C, g, g)
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # (B, g², C), row-major over the grid
        cls_token = self.cls_embedding.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_token, x), dim=1)  # (B, 1 + g², C)
        return x + self.position_table(grid).unsqueeze(0)


class VisionAttention(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.num_heads = vc.num_heads
        self.query_key_value = nn.Linear(vc.hidden_size, vc.hidden_size * 3)
        self.dense = nn.Linear(vc.hidden_size, vc.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.query_key_value(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, h, L, d)
        # Bidirectional attention over CLS + patches; SDPA's default scale is head_dim**-0.5 as in the reference.
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, h, L, d)
        return self.dense(out.transpose(1, 2).reshape(b, n, -1))


class VisionMLP(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        if vc.hidden_act != "gelu":
            raise ValueError(f"vision hidden_act {vc.hidden_act!r} is not supported (GLM-4V uses exact 'gelu')")
        self.fc1 = nn.Linear(vc.hidden_size, vc.intermediate_size)
        self.fc2 = nn.Linear(vc.intermediate_size, vc.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    """One EVA2-CLIP block: x + LN(attn(x)), then x + LN(mlp(x)) — normalisation on the branch output."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.attention = VisionAttention(vc)
        self.mlp = VisionMLP(vc)
        self.post_attention_layernorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class VisionTransformer(nn.Module):
    """The 63 layers (``transformer.vision.transformer.layers.N``); run by :meth:`EVA2CLIPModel.run_layers`."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([VisionLayer(vc) for _ in range(vc.num_hidden_layers)])


class GLU(nn.Module):
    """Projector into the LM: linear → LayerNorm(eps 1e-5) → GELU → SwiGLU with silu on ``gate_proj``."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        h, f = config.hidden_size, config.ffn_hidden_size
        self.linear_proj = nn.Linear(h, h, bias=False)
        self.norm1 = nn.LayerNorm(h)  # default eps 1e-5, as in the reference
        self.dense_h_to_4h = nn.Linear(h, f, bias=False)
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.dense_4h_to_h = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    """pixels (B, 3, N, N) → image embeddings (B, (N/28)² + 2, H) for the LM, boi/eoi and ÷scaling included."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        vc = config.vision
        self.patch_size = vc.patch_size
        self.patch_embedding = PatchEmbedding(vc)
        self.transformer = VisionTransformer(vc)
        self.conv = nn.Conv2d(vc.hidden_size, config.hidden_size, kernel_size=2, stride=2)
        self.linear_proj = GLU(config)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.scaling_factor = vc.scaling_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.proj.weight.dtype

    def check_image_size(self, size: int) -> None:
        if size % (2 * self.patch_size) or size < 2 * self.patch_size:
            raise ValueError(f"vision size {size} must be a positive multiple of {2 * self.patch_size}")

    # The forward pass in three stages, so a scheduler can interleave the 63 ViT layers with other work.
    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, N, N) → (B, 1 + (N/14)², C): patch embeddings with CLS and position table."""
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images must be square, got {tuple(images.shape[-2:])}")
        self.check_image_size(images.shape[-1])
        return self.patch_embedding(images)

    def run_layers(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        for layer in self.transformer.layers[start:end]:
            x = layer(x)
        return x

    @property
    def num_layers(self) -> int:
        return len(self.transformer.layers)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + g², C) ViT output → (B, (g/2)² + 2, H): drop CLS, 2×2 conv, GLU, boi/eoi, ÷ scaling_factor."""
        x = x[:, 1:]  # drop CLS → (B, g², C)
        b, s, c = x.shape
        grid = math.isqrt(s)
        x = x.view(b, grid, grid, c).permute(0, 3, 1, 2)  # (B, C, g, g)
        x = self.conv(x).flatten(2).transpose(1, 2)  # (B, (g/2)², H), row-major over the merged grid
        x = self.linear_proj(x)
        x = torch.cat((self.boi.expand(b, -1, -1), x, self.eoi.expand(b, -1, -1)), dim=1)  # (B, (g/2)² + 2, H)
        return x / self.scaling_factor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.run_layers(self.embed_patches(images)))
