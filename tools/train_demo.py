"""Train the shipped demo checkpoint: a small model of the exact GLM-4V architecture that answers visual questions.

    .venv/bin/python tools/train_demo.py --out glm4v/demo_model        # ~27 min on a 2-core CPU (make demo-model)

What it builds: the official ``config.json`` fields, key names and folder layout (``glm4v.tiny.write_model_folder``)
at toy sizes — a 4-layer EVA2-CLIP ViT at 112 px (patch 14, 2×2 conv → 16 image tokens + boi/eoi) and a 4-layer
GLM-4 language model — with the project's own byte-level BPE tokenizer trained on the task sentences. It learns the
procedurally drawn questions of ``profiling/vqa_demo.py`` (colour, shape, count, position, size, a printed word, a
digital clock, the tallest bar) answered in short sentences, several per picture as a multi-turn chat, plus a few
plain-text exchanges.

Seeded and deterministic for a given machine and torch build (a fixed number of steps, every random draw from a
seeded generator, two intra-op threads, deterministic kernels). Images come from training seeds only
(``random.Random(seed)`` streams below the held-out set's seed, see ``vqa_demo.demo_items``) and are augmented the
way a client's would differ: drawn at other sizes and resized by the server's own preprocessing, JPEG-compressed.

Initial values matter at this scale (trial runs in docs/DEMO.md): image embeddings scaled to the token embeddings'
magnitude, 2-D sine-cosine vision positions, fan-in init and mimetic attention for the tower; then AdamW with
warm-up and cosine decay. Throw-away auxiliary heads on the mean of the image tokens (:class:`AuxHeads`) teach the
tower features the language model can read before it has learned where to look: they are what taught it position
and shape (held-out 0.38 → 0.86 and 0.40 → 0.88).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm4v import GLM4Tokenizer, ImageProcessor, Message, SamplingParams, expanded_length, generation_prompt  # noqa: E402
from glm4v.chat_template import build_prompt  # noqa: E402
from glm4v.config import ChatGLMConfig  # noqa: E402
from glm4v.generate import generate_text  # noqa: E402
from glm4v.modeling import ChatGLMForConditionalGeneration  # noqa: E402
from glm4v.tiny import _CORPUS, make_config, rotary_inv_freq, train_ranks, write_model_folder  # noqa: E402
from glm4v.tokenizer import SPECIAL_TOKENS  # noqa: E402
from profiling.vqa_demo import (  # noqa: E402
    COLOURS,
    MAX_COUNT,
    NATIVE,
    POSITIONS,
    SHAPES,
    SIZES,
    WORDS,
    demo_item,
    demo_items,
    follow_up_questions,
    text_exchanges,
    vocabulary_text,
)

ARCH = dict(
    n_ranks=1200,
    num_layers=4,
    hidden_size=256,
    num_attention_heads=4,
    kv_channels=64,
    multi_query_group_num=2,
    ffn_hidden_size=512,
    vision_hidden_size=192,
    vision_heads=3,
    vision_intermediate_size=384,
    vision_layers=4,
)
# The model's native vision size: 112 px (8×8 patches → 16 image tokens). A trial run at 224 px native (progressive
# resizing from 112) learned colour and charts but not position: 224-px steps cost four times as much.
IMAGE_SIZE = 112
# Harder kinds are drawn more often (weights found by short runs: colour and size are learned first). A run with
# count 2.2, colour 0.35, size 0.2 gave count 0.72 but position 0.80 (all 0.698): not kept.
KIND_WEIGHTS = {
    "colour": 0.5,
    "shape": 1.8,
    "count": 1.5,
    "position": 2.5,
    "size": 0.3,
    "word": 0.6,
    "clock": 0.4,
    "chart": 0.4,
}


# The auxiliary objective's labels: what each picture shows, read by a linear head from the *mean* of its image tokens.
AUX_LABELS = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "position": POSITIONS,
    "count": tuple(str(n) for n in range(1, MAX_COUNT + 1)),
    "size": SIZES,
    "word": WORDS,
}


def aux_targets(meta: dict) -> dict[str, int]:
    """The labels a picture has: its kind's value, plus the shape and colour of every one-shape picture."""
    kind, out = meta["kind"], {}
    if kind in AUX_LABELS:
        out[kind] = AUX_LABELS[kind].index(meta["value"])
    if kind in ("colour", "shape", "position", "size", "count"):
        out["shape"] = SHAPES.index(meta["shape"])
        out["colour"] = AUX_LABELS["colour"].index(meta["colour"])
    return out


class AuxHeads(torch.nn.Module):
    """Throw-away linear heads on the mean of a picture's image tokens (never saved).

    The language model sees the image tokens at one shared position, so it must *select* the tokens that hold an
    object before it can say where the object is; at the start its attention is close to a uniform average. These
    heads ask the tower for features that an average already answers — position, shape, count, colour, size, word —
    so the language model can read them before it has learned to select. One more head, per image token, names the
    shape whose ink the token's 28×28-pixel square holds (or none): sixteen labels a picture instead of one, which
    teaches the tower shapes faster (a short trial: 0.60 against 0.51 after 300 tower-only steps)."""

    def __init__(self, width: int, mean, std):
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in AUX_LABELS.items()})
        self.token_head = torch.nn.Linear(width, len(SHAPES) + 1)
        self.white = ((1 - torch.tensor(mean)) / torch.tensor(std)).view(1, 3, 1, 1)  # a white pixel, normalised
        self.accuracy = {k: 1 / len(v) for k, v in AUX_LABELS.items()}  # running, for the log

    def token_labels(self, pixels: torch.Tensor, shapes: torch.Tensor, tokens: int) -> torch.Tensor:
        """(B, tokens): each token's shape index where ≥ 10 % of its pixels are ink (not white), else len(SHAPES)."""
        ink = ((pixels - self.white).abs().amax(1, keepdim=True) > 0.3).float()
        side = pixels.shape[-1] // math.isqrt(tokens)
        frac = F.avg_pool2d(ink, side).flatten(1)
        return torch.where(frac > 0.1, shapes[:, None], torch.full_like(frac, len(SHAPES), dtype=torch.long))

    def forward(
        self, pixels: torch.Tensor, image_embeds: torch.Tensor, targets: list[dict[str, int]], scale: float
    ) -> torch.Tensor:
        tokens = image_embeds[:, 1:-1] * scale  # image tokens without boi/eoi, at the projector's scale
        pooled = tokens.mean(1)
        losses = []
        rows = [i for i, t in enumerate(targets) if "shape" in t]
        if rows:
            shapes = torch.tensor([targets[i]["shape"] for i in rows])
            labels = self.token_labels(pixels[rows], shapes, tokens.shape[1])
            losses.append(F.cross_entropy(self.token_head(tokens[rows]).flatten(0, 1), labels.flatten()))
        for name, head in self.heads.items():
            rows = [i for i, t in enumerate(targets) if name in t]
            if rows:
                y = torch.tensor([targets[i][name] for i in rows])
                logits = head(pooled[rows])
                losses.append(F.cross_entropy(logits, y))
                hits = (logits.argmax(1) == y).float().sum().item()
                self.accuracy[name] = 0.98 * self.accuracy[name] + 0.02 * hits / len(rows)
        return torch.stack(losses).mean()


def build(seed: int):
    config = make_config("tiny", image_size=IMAGE_SIZE, **ARCH)
    config["_name_or_path"] = "glm4v-edge/demo"
    ranks = train_ranks(config["pad_token_id"], _CORPUS + vocabulary_text())
    special = {t: config["pad_token_id"] + i for i, t in enumerate(SPECIAL_TOKENS)}
    tok = GLM4Tokenizer(ranks, special, IMAGE_SIZE)
    torch.manual_seed(seed)
    cfg = ChatGLMConfig(**{k: v for k, v in config.items() if k not in ("auto_map", "architectures")})
    model = ChatGLMForConditionalGeneration(cfg).float()
    with torch.no_grad():  # image embeddings at the token embeddings' scale (see the module docstring)
        v = model.transformer.vision
        for m in v.modules():  # PyTorch's own (fan-in) init for the tower: it learned faster than N(0, 0.02) in trials
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.reset_parameters()
        for layer in v.transformer.layers:  # mimetic attention init (Trockman & Kolter 2023): W_q·W_kᵀ ≈ W_v ≈ I
            qkv, d = layer.attention.query_key_value.weight, layer.attention.dense.weight.shape[0]
            eye = torch.eye(d)
            for i in range(3):
                qkv[i * d : (i + 1) * d].copy_(eye + 0.02 * torch.randn(d, d))
            layer.attention.dense.weight.copy_(eye + 0.02 * torch.randn(d, d))
        pe = v.patch_embedding.position_embedding.weight  # 2-D sin-cos positions (MAE), at the patches' scale
        pe[0].zero_()
        pe[1:].copy_(sincos_2d(pe.shape[1], v.patch_embedding.trained_grid))
        v.linear_proj.dense_4h_to_h.weight.mul_(40.0)
        v.boi.normal_(0, 1).mul_(v.scaling_factor)
        v.eoi.normal_(0, 1).mul_(v.scaling_factor)
    return config, ranks, tok, model


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid², dim) fixed 2-D sine-cosine position codes (MAE's), half the channels for rows, half for columns."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


class Stream:
    """An endless seeded stream of (pixels, prompt ids, answer ids)."""

    def __init__(self, tok: GLM4Tokenizer, seed: int):
        self.tok = tok
        self.rng = random.Random(seed)
        self.kinds = list(KIND_WEIGHTS)
        self.weights = [KIND_WEIGHTS[k] for k in self.kinds]
        self.eos = tok.token_id("<|user|>")
        self.proc = ImageProcessor(IMAGE_SIZE)
        # Recent loss per kind, for the log.
        self.loss = {k: 1.0 for k in self.kinds}

    def record(self, kinds: list[str], losses: torch.Tensor) -> None:
        for k, v in zip(kinds, losses.tolist(), strict=True):
            self.loss[k] = 0.97 * self.loss[k] + 0.03 * v

    def image_batch(self, n: int, size: int):
        out = []
        self.last_kinds, self.last_targets = [], []
        for _ in range(n):
            kind = self.rng.choices(self.kinds, self.weights)[0]
            self.last_kinds.append(kind)
            side = NATIVE if self.rng.random() < 0.6 else self.rng.randint(160, 480)
            item = demo_item(kind, self.rng, side)
            self.last_targets.append(aux_targets(item.meta))
            im = item.open_image()
            if self.rng.random() < 0.3:
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=self.rng.randint(60, 95))
                im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
            px = self.proc(im, size)
            qa = [(item.question, item.answers[0])] + follow_up_questions(item, self.rng)
            self.rng.shuffle(qa)
            out.append((px, *self.conversation(qa)))
        return out

    def conversation(self, qa: list[tuple[str, str]], image: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """One chat about the image: the ids, and the (start, end) spans to learn — each answer and the
        ``<|user|>`` that ends its turn (the chat template's own prefixes, so generation sees the same ids)."""
        messages, spans = [], []
        for i, (q, a) in enumerate(qa):
            messages.append(Message("user", q, has_image=image and i == 0))
            start = len(generation_prompt(self.tok, messages).ids)
            messages.append(Message("assistant", a))
            spans.append((start, start + len(self.tok.encode(a)) + 1))
        ids = build_prompt(self.tok, messages, add_generation_prompt=False).ids + [self.eos]
        return ids, spans

    def text_batch(self, n: int):
        out = []
        for _ in range(n):
            q, a = self.rng.choice(text_exchanges())
            out.append((None, *self.conversation([(q, a)], image=False)))
        return out


def batch_loss(model, batch, pad: int, image_extra: int, per_row: bool = False):
    """Next-token loss on the answers (and their end-of-turn tokens) only; with ``per_row``, also each row's."""
    width = max(len(seq) for _, seq, _ in batch)
    ids = torch.full((len(batch), width), pad)
    tgt = torch.full((len(batch), width), -100)
    for i, (_, seq, spans) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        for start, end in spans:  # predict each target id from the one before it
            tgt[i, start - 1 : end - 1] = torch.tensor(seq[start:end])
    if batch[0][0] is None:
        logits = model(ids).logits
    else:
        logits = model(ids, pixel_values=torch.stack([x for x, _, _ in batch])).logits[:, image_extra:]
    flat = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100, reduction="none"
    ).view(tgt.shape)
    counted = (tgt != -100).sum()
    loss = flat.sum() / counted
    if per_row:
        return loss, (flat.sum(1) / (tgt != -100).sum(1)).detach()
    return loss


def greedy(model, tok, question: str, pixels: torch.Tensor | None, max_new: int = 16) -> str:
    """The answer by the project's own decode loop (glm4v.generate), greedy."""
    ids = generation_prompt(tok, [Message("user", question, has_image=pixels is not None)]).ids
    image_tokens = model.config.vision.image_tokens(pixels.shape[-1]) if pixels is not None else None
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0)
    with torch.inference_mode():
        text, _, _ = generate_text(
            model, tok, ids, pixels, params, max_len=expanded_length(len(ids), image_tokens) + max_new
        )
    return text


def held_out(model, tok, n: int, size: int = IMAGE_SIZE) -> dict:
    proc = ImageProcessor(size)
    items = demo_items(n)
    by_kind: dict[str, list[int]] = {}
    for it in items:
        ok = greedy(model, tok, it.question, proc(it.open_image())) == it.answers[0]
        by_kind.setdefault(it.category, []).append(ok)
    by_kind_acc = {k: round(sum(v) / len(v), 3) for k, v in by_kind.items()}
    return {"accuracy": round(sum(map(sum, by_kind.values())) / n, 3), "by_kind": by_kind_acc}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="glm4v/demo_model", help="checkpoint folder (default: the shipped one)")
    ap.add_argument("--steps", type=int, default=4400)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-items", type=int, default=400, help="held-out items scored at the end (0: none)")
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--aux", type=float, default=1.0, help="weight of the mean-pooled auxiliary heads (0: off)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--probe-every", type=int, default=0, help="score 48 held-out items every N steps (0: never)")
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    config, ranks, tok, model = build(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_params / 1e6:.2f} M, vocabulary {len(ranks)} ranks", flush=True)
    stream = Stream(tok, args.seed)
    aux = AuxHeads(config["hidden_size"], stream.proc.mean, stream.proc.std)
    captured = {}
    model.transformer.vision.register_forward_hook(lambda m, i, o: captured.update(pixels=i[0], embeds=o))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay + list(aux.parameters()), "weight_decay": args.wd},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
    )
    warmup = max(1, args.steps // 30)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    pad = config["pad_token_id"]
    model.train()
    t0 = time.time()
    running = None
    for step in range(args.steps):
        size = IMAGE_SIZE
        extra = model.config.vision.image_tokens(size) - 3
        loss, rows = batch_loss(model, stream.image_batch(args.batch, size), pad, extra, per_row=True)
        stream.record(stream.last_kinds, rows)
        if args.aux:
            scale = model.transformer.vision.scaling_factor
            loss = loss + args.aux * aux(captured["pixels"], captured["embeds"], stream.last_targets, scale)
        if step % 4 == 0:
            loss = loss + 0.25 * batch_loss(model, stream.text_batch(8), pad, 0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % args.log_every == 0:
            el = time.time() - t0
            print(f"step {step + 1}/{args.steps} loss {running:.3f} lr {lr_at(step):.2e} {el:.0f}s", flush=True)
            print("  kind losses " + " ".join(f"{k} {v:.2f}" for k, v in stream.loss.items()), flush=True)
            if args.aux:
                print("  aux accuracy " + " ".join(f"{k} {v:.2f}" for k, v in aux.accuracy.items()), flush=True)
        if args.probe_every and (step + 1) % args.probe_every == 0:
            model.eval()
            r = held_out(model, tok, 48, size)
            print(f"  probe at {size} px: {r['accuracy']:.2f} {r['by_kind']}", flush=True)
            model.train()
    train_s = time.time() - t0
    model.eval()

    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    sd["transformer.rotary_pos_emb.inv_freq"] = rotary_inv_freq(config)
    out = write_model_folder(args.out, config, ranks, sd)
    report = {
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "parameters": n_params,
        "train_seconds": round(train_s, 1),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "aux": args.aux,
        "final_loss": round(running, 4),  # answers' loss + aux × the auxiliary heads' loss
    }
    if args.eval_items:
        model.to(torch.bfloat16)  # score what is shipped: the bf16 weights
        model.float()
        report["held_out_fp32"] = held_out(model, tok, args.eval_items)
        print(json.dumps(report["held_out_fp32"], indent=1), flush=True)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} in {train_s / 60:.1f} min of training", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
