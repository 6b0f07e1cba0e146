"""An independent, deliberately plain re-implementation of GLM-4V-9B written from the reference pseudocode
(docs/MODEL.md §10).

It shares no code with ``glm4v``: plain tensors from the safetensors file, loops, explicit formulas. The network
under test must produce the same logits, which catches layout slips (qkv split, interleaved RoPE, post-branch
LayerNorm, gate-first SwiGLU, the ÷8, compressed positions) that a self-consistency test cannot.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


class Reference:
    def __init__(self, model_dir: Path):
        self.cfg = json.loads((Path(model_dir) / "config.json").read_text())
        self.w = {k: v.float() for k, v in load_file(str(Path(model_dir) / "model.safetensors")).items()}

    def vision(self, pix):  # pix (3, N, N) → (P+2, H)
        vc, w = self.cfg["vision_config"], self.w
        pre = "transformer.vision."
        x = F.conv2d(
            pix[None],
            w[pre + "patch_embedding.proj.weight"],
            w[pre + "patch_embedding.proj.bias"],
            stride=vc["patch_size"],
        )[0]  # (C, g, g)
        C, g, _ = x.shape
        x = x.reshape(C, g * g).T  # (g², C), row-major
        x = (
            torch.cat([w[pre + "patch_embedding.cls_embedding"], x])
            + w[pre + "patch_embedding.position_embedding.weight"]
        )
        nh = vc["num_heads"]
        d = C // nh
        for j in range(vc["num_hidden_layers"]):
            L = f"{pre}transformer.layers.{j}."
            qkv = x @ w[L + "attention.query_key_value.weight"].T + w[L + "attention.query_key_value.bias"]
            q, k, v = qkv[:, :C], qkv[:, C : 2 * C], qkv[:, 2 * C :]
            heads = []
            for h in range(nh):
                s = slice(h * d, (h + 1) * d)
                a = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(d), dim=-1)
                heads.append(a @ v[:, s])
            att = torch.cat(heads, 1) @ w[L + "attention.dense.weight"].T + w[L + "attention.dense.bias"]
            x = x + F.layer_norm(
                att, (C,), w[L + "input_layernorm.weight"], w[L + "input_layernorm.bias"], vc["layer_norm_eps"]
            )
            m = (
                F.gelu(x @ w[L + "mlp.fc1.weight"].T + w[L + "mlp.fc1.bias"]) @ w[L + "mlp.fc2.weight"].T
                + w[L + "mlp.fc2.bias"]
            )
            x = x + F.layer_norm(
                m,
                (C,),
                w[L + "post_attention_layernorm.weight"],
                w[L + "post_attention_layernorm.bias"],
                vc["layer_norm_eps"],
            )
        x = x[1:].T.reshape(1, C, g, g)
        x = F.conv2d(x, w[pre + "conv.weight"], w[pre + "conv.bias"], stride=2)[0]  # (H, g/2, g/2)
        H = x.shape[0]
        x = x.reshape(H, -1).T
        x = x @ w[pre + "linear_proj.linear_proj.weight"].T
        x = F.gelu(F.layer_norm(x, (H,), w[pre + "linear_proj.norm1.weight"], w[pre + "linear_proj.norm1.bias"], 1e-5))
        x = (
            F.silu(x @ w[pre + "linear_proj.gate_proj.weight"].T) * (x @ w[pre + "linear_proj.dense_h_to_4h.weight"].T)
        ) @ w[pre + "linear_proj.dense_4h_to_h.weight"].T
        x = torch.cat([w[pre + "boi"][0], x, w[pre + "eoi"][0]])
        return x / vc["scaling_factor"]

    def rms(self, x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg["layernorm_epsilon"]))

    def rope(self, x, pos):  # x (S, heads, d): rotate pairs (2i, 2i+1) of the first d/2 dims by pos·θ_i
        d = x.shape[-1]
        rd = d // 2
        out = x.clone()
        for i in range(rd // 2):
            theta = 10000.0 ** (-2 * i / rd)
            a = pos.float()[:, None] * theta
            x0, x1 = x[..., 2 * i], x[..., 2 * i + 1]
            out[..., 2 * i] = x0 * torch.cos(a) - x1 * torch.sin(a)
            out[..., 2 * i + 1] = x1 * torch.cos(a) + x0 * torch.sin(a)
        return out

    def logits(self, ids: list[int], pix=None):
        c, w = self.cfg, self.w
        E = w["transformer.embedding.word_embeddings.weight"][torch.tensor(ids)]
        P = torch.arange(len(ids))
        if pix is not None:
            b = ids.index(c["boi_token_id"])
            e = ids.index(c["eoi_token_id"])
            assert e == b + 2
            V = self.vision(pix)
            E = torch.cat([E[:b], V, E[e + 1 :]])
            P = torch.cat([P[: b + 1], P[b + 1].repeat(V.shape[0] - 2), P[e:]])
        x = E
        S = x.shape[0]
        nh, ng, d = c["num_attention_heads"], c["multi_query_group_num"], c["kv_channels"]
        for i in range(c["num_layers"]):
            L = f"transformer.encoder.layers.{i}."
            h = self.rms(x, w[L + "input_layernorm.weight"])
            qkv = h @ w[L + "self_attention.query_key_value.weight"].T + w[L + "self_attention.query_key_value.bias"]
            q = qkv[:, : nh * d].reshape(S, nh, d)
            k = qkv[:, nh * d : (nh + ng) * d].reshape(S, ng, d)
            v = qkv[:, (nh + ng) * d :].reshape(S, ng, d)
            q, k = self.rope(q, P), self.rope(k, P)
            mask = torch.ones(S, S, dtype=torch.bool).tril()
            outs = []
            for hd in range(nh):
                g = hd // (nh // ng)  # query head h uses KV group ⌊h / (nh/ng)⌋
                s = (q[:, hd] @ k[:, g].T) / math.sqrt(d)
                s = s.masked_fill(~mask, float("-inf"))
                outs.append(torch.softmax(s, -1) @ v[:, g])
            x = x + torch.cat(outs, 1) @ w[L + "self_attention.dense.weight"].T
            h = self.rms(x, w[L + "post_attention_layernorm.weight"]) @ w[L + "mlp.dense_h_to_4h.weight"].T
            gate, up = h[:, : c["ffn_hidden_size"]], h[:, c["ffn_hidden_size"] :]
            x = x + (F.silu(gate) * up) @ w[L + "mlp.dense_4h_to_h.weight"].T
        x = self.rms(x, w["transformer.encoder.final_layernorm.weight"])
        return x @ w["transformer.output_layer.weight"].T, P
