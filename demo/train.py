"""Train the embedded demo model: the Flamingo recipe at toy scale on the synthetic few-shot task.

``python -m demo.train --out models/demo [--steps-scale F] [--json]`` runs, seeded: a byte-level
BPE tokenizer; a small LLaMA pretrained on the domain's text (its answer lists teach the
in-context "same category" skill); a small CLIP ViT trained contrastively, half of each batch
minimal pairs; then, both frozen as in OpenFlamingo, the Perceiver resampler, gated
cross-attention before every decoder layer and the tied token embeddings on 8-shot episodes
with OpenFlamingo's loss; evaluation at 0/1/2/4/8 shots on held-out pairs. ``--eval-only
--model DIR`` prints the table. The files are the formats users have, loaded by
``load_flamingo``. Departures from OpenFlamingo, all read back from the files: resampler depth 2
with 32 latents, tied token embeddings, tanh gates at ``gate_lr_scale`` x the learning rate.
The recipe step by step, the files written and the reasons: docs/demo.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from demo.task import (
    ATTRIBUTES,
    COLOURS,
    COUNTS,
    EVAL_SEED,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    Episode,
    eval_episodes,
    sample_scene,
    sample_variant,
)
from flamingo.config import (
    DECODER_LAYERS_ATTR,
    CrossAttentionConfig,
    FlamingoConfig,
    ResamplerConfig,
    VisionConfig,
)
from flamingo.loaders import (
    lm_config_from_hf,
    load_flamingo,
    load_tokenizer,
    map_lm_key,
    read_hf_weights,
    read_vision,
)
from flamingo.model import Flamingo, VisionTransformer, media_index_from_ids, position_ids_from_mask
from runtime.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PreprocessConfig, preprocess
from runtime.prompts import EOC_TOKEN, MEDIA_TOKEN

SHOTS = (0, 1, 2, 4, 8)
MAX_SHOTS = 8


@dataclass
class DemoConfig:
    """Every size and step count of the demo model (the defaults are what ships)."""

    seed: int = 0
    # tokenizer + language model
    vocab_size: int = 448  # upper bound: the BPE stops when no pair is left (393 tokens)
    lm_hidden: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_kv_heads: int = 2
    lm_steps: int = 600
    lm_batch: int = 16
    lm_seq: int = 64
    lm_lr: float = 1e-3
    # CLIP
    vision_width: int = 128
    vision_layers: int = 4
    vision_head_width: int = 64
    patch_size: int = 8
    embed_dim: int = 64
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    clip_steps: int = 1200
    clip_batch: int = 128
    clip_lr: float = 2e-3
    # Flamingo
    resampler_depth: int = 2
    num_latents: int = 32
    cross_attn_every_n_layers: int = 1
    flamingo_steps: int = 500
    pool_images: int = 48  # images encoded per step, shared by the episodes of the step
    episodes: int = 16
    flamingo_lr: float = 1e-3
    gate_lr_scale: float = 10.0
    # evaluation
    eval_n: int = 200
    eval_seed: int = EVAL_SEED

    def scaled(self, factor: float) -> DemoConfig:
        """Step counts times `factor` (at least 2 each): `--steps-scale 0.01` is a CI smoke run."""

        def s(n: int) -> int:
            return max(2, round(n * factor))

        return replace(
            self,
            lm_steps=s(self.lm_steps),
            clip_steps=s(self.clip_steps),
            flamingo_steps=s(self.flamingo_steps),
        )


# ---------------------------------------------------------------------------------------------
# Text of the domain and the tokenizer
# ---------------------------------------------------------------------------------------------


# Between answers of a list: separators of 1-3 tokens, so the LM learns to find earlier answers
# by content rather than at a fixed distance (Flamingo prompts put `<|endofchunk|>\n<image>`
# there, tokens the LM has never seen).
_SEPARATORS = ("\n", "\n\n", ". ", ".\n", " ; ", " | ", "\n- ", ", then\n", " and\n")


def lm_document(rng: random.Random) -> str:
    """One pretraining document: an answer list of one attribute (70%), captions or statements.

    The lists are where the LM learns in-context "same category as the earlier answers"
    (how fast, by learning rate: docs/measurements.md).
    """
    kind = rng.random()
    if kind < 0.7:
        values = ATTRIBUTES[rng.choice(tuple(ATTRIBUTES))]
        n = rng.randint(2, 10)
        return "".join(f"Output:{rng.choice(values)}{rng.choice(_SEPARATORS)}" for _ in range(n))
    scenes = [sample_scene(rng, "train") for _ in range(rng.randint(1, 4))]
    if kind < 0.85:
        return " ".join(s.caption().capitalize() + "." for s in scenes)
    parts = []
    for s in scenes:
        attrs = rng.sample(tuple(ATTRIBUTES), rng.randint(1, len(ATTRIBUTES)))
        parts.append(" ".join(f"The {a} is {s.answer(a)}." for a in attrs))
    return "\n".join(parts)


def build_tokenizer(seed: int, vocab_size: int):
    """Byte-level BPE on the domain text, LLaMA's special tokens: <unk> <s> </s>, <s> prepended,
    no pad (so OpenFlamingo's loader adds <PAD>, as for the released LLaMA-family models)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from demo.bpe import train_byte_bpe  # deterministic merges (ties broken by text)

    rng = random.Random(f"flamingo-demo/tokenizer/{seed}")
    corpus = "\n".join(lm_document(rng) for _ in range(3000))
    specials = ["<unk>", "<s>", "</s>"]
    vocab, merges = train_byte_bpe(corpus, vocab_size, specials)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------------------------------------
# Stage 1: the language model
# ---------------------------------------------------------------------------------------------


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warmup over 5% of the steps, then cosine decay to 10% of the peak."""
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lm_batches(tok, cfg: DemoConfig) -> Iterator[torch.Tensor]:
    """Packed (batch, seq) token rows of documents, each `<s> doc </s>`."""
    rng = random.Random(f"flamingo-demo/lm/{cfg.seed}")
    need = cfg.lm_batch * cfg.lm_seq
    buffer: list[int] = []
    while True:
        while len(buffer) < need:
            docs = [lm_document(rng) for _ in range(64)]
            for ids in tok(docs)["input_ids"]:
                buffer.extend([*ids, tok.eos_token_id])
        rows, buffer = buffer[:need], buffer[need:]
        yield torch.tensor(rows).view(cfg.lm_batch, cfg.lm_seq)


def build_lm(tok, cfg: DemoConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.lm_hidden,
        intermediate_size=-(-cfg.lm_hidden * 8 // 3 // 16) * 16,
        num_hidden_layers=cfg.lm_layers,
        num_attention_heads=cfg.lm_heads,
        num_key_value_heads=cfg.lm_kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def train_lm(lm, tok, cfg: DemoConfig, log: Callable[[str], None]) -> list[float]:
    """Next-token pretraining; returns the loss of every step."""
    lm.train()
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lm_lr, weight_decay=0.1, betas=(0.9, 0.95))
    losses = []
    for step, rows in zip(range(cfg.lm_steps), lm_batches(tok, cfg)):
        set_lr(opt, lr_at(step, cfg.lm_steps, cfg.lm_lr))
        loss = lm(input_ids=rows, labels=rows).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.lm_steps - 1:
            log(f"lm step {step:4d} loss {loss.item():.4f}")
    lm.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# Stage 2: CLIP (our reference ViT with open_clip names + a small open_clip-style text tower)
# ---------------------------------------------------------------------------------------------

TEXT_CONTEXT = 8
# which attribute a hard negative changes (colour, shape, count, position, size): shape is the
# hardest to see and the one held-out pairs test, so it gets the most minimal pairs
VARIANT_WEIGHTS = (0.5, 2.0, 1.5, 1.0, 0.5)


def text_vocab() -> list[str]:
    """Word vocabulary of the captions; <eot> last so open_clip's argmax pooling finds it."""
    nouns = [s + ("es" if s == "cross" else "s") for s in SHAPES]
    words = [*COUNTS, *SIZES, *COLOURS, *SHAPES, *nouns, *POSITIONS, "on", "in", "the"]
    return ["<pad>", *words, "<eot>"]


def encode_captions(captions: Sequence[str], vocab: list[str]) -> torch.Tensor:
    index = {w: i for i, w in enumerate(vocab)}
    out = torch.zeros(len(captions), TEXT_CONTEXT, dtype=torch.long)
    for row, caption in enumerate(captions):
        ids = [index[w] for w in caption.split()] + [index["<eot>"]]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


class TextBlock(nn.Module):
    """open_clip's ResidualAttentionBlock (names ln_1, attn.in_proj_*, mlp.c_fc/c_proj)."""

    def __init__(self, width: int, heads: int, act: nn.Module) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, 4 * width)),
                    ("gelu", act),
                    ("c_proj", nn.Linear(4 * width, width)),
                ]
            )
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Clip(nn.Module):
    """open_clip ``CLIP``'s layout: ``visual.*`` plus the text tower at the top level."""

    def __init__(self, vision: VisionConfig, cfg: DemoConfig, vocab_size: int) -> None:
        super().__init__()
        from flamingo.model import QuickGELU

        self.visual = VisionTransformer(vision)
        w = vision.width
        scale = w**-0.5  # open_clip's init of the parameters our reference leaves at zero
        nn.init.normal_(self.visual.class_embedding, std=scale)
        nn.init.normal_(self.visual.positional_embedding, std=scale)
        nn.init.normal_(self.visual.proj, std=scale)
        tw = cfg.text_width
        self.token_embedding = nn.Embedding(vocab_size, tw)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.positional_embedding = nn.Parameter(torch.randn(TEXT_CONTEXT, tw) * 0.01)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            TextBlock(tw, cfg.text_heads, QuickGELU()) for _ in range(cfg.text_layers)
        )
        self.ln_final = nn.LayerNorm(tw)
        self.text_projection = nn.Parameter(torch.randn(tw, cfg.embed_dim) * tw**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        causal = torch.full((TEXT_CONTEXT, TEXT_CONTEXT), float("-inf")).triu(1)
        self.register_buffer("attn_mask", causal, persistent=False)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(text) + self.positional_embedding
        for block in self.transformer.resblocks:
            x = block(x, self.attn_mask)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, pixels: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image = F.normalize(self.visual(pixels)[0], dim=-1)
        text = F.normalize(self.encode_text(text), dim=-1)
        return image, text, self.logit_scale.exp().clamp(max=100)


def to_pixels(images: Sequence[Any]) -> torch.Tensor:
    """open_clip eval preprocessing, the runtime's own implementation (64 px, OpenAI mean/std)."""
    return torch.from_numpy(preprocess(images, PreprocessConfig(image_size=IMAGE_SIZE)))


def vision_config(cfg: DemoConfig) -> VisionConfig:
    return VisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=cfg.patch_size,
        width=cfg.vision_width,
        layers=cfg.vision_layers,
        heads=cfg.vision_width // cfg.vision_head_width,
        embed_dim=cfg.embed_dim,
        act="quick_gelu",
    )


def train_clip(clip: Clip, cfg: DemoConfig, log: Callable[[str], None]) -> list[float]:
    """Symmetric InfoNCE; pairs with the same caption in a batch are all positives."""
    rng = random.Random(f"flamingo-demo/clip/{cfg.seed}")
    vocab = text_vocab()
    decay = [p for n, p in clip.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in clip.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.clip_lr,
        betas=(0.9, 0.98),
    )
    clip.train()
    losses = []
    for step in range(cfg.clip_steps):
        set_lr(opt, lr_at(step, cfg.clip_steps, cfg.clip_lr))
        # half the batch: minimal pairs (one attribute changed), so every attribute must be seen
        # (with plain random batches position and shape stayed near chance: docs/measurements.md)
        base = [sample_scene(rng, "train") for _ in range(cfg.clip_batch // 2)]
        changed = rng.choices(tuple(ATTRIBUTES), weights=VARIANT_WEIGHTS, k=len(base))
        scenes = base + [sample_variant(rng, s, "train", a) for s, a in zip(base, changed)]
        captions = [s.caption() for s in scenes]
        pixels = to_pixels([s.render() for s in scenes])
        image, text, scale = clip(pixels, encode_captions(captions, vocab))
        logits = scale * image @ text.t()
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (
            -(target * logits.log_softmax(1)).sum(1).mean()
            - (target * logits.t().log_softmax(1)).sum(1).mean()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.clip_steps - 1:
            log(f"clip step {step:4d} loss {loss.item():.4f} scale {scale.item():.1f}")
    clip.eval()
    return losses


@torch.no_grad()
def clip_caption_accuracy(clip: Clip, n: int, seed: int) -> dict[str, float]:
    """Zero-shot probe on held-out pairs: per attribute, does the image pick the caption whose
    one attribute is right among captions that vary only that attribute?"""
    rng = random.Random(f"flamingo-demo/clip-probe/{seed}")
    vocab = text_vocab()
    scenes = [sample_scene(rng, "heldout") for _ in range(n)]
    image = F.normalize(clip.visual(to_pixels([s.render() for s in scenes]))[0], dim=-1)
    out = {}
    for attr, values in ATTRIBUTES.items():
        hits = 0
        for s, emb in zip(scenes, image):
            caps = [replace(s, **{attr: v}).caption() for v in values]
            text = F.normalize(clip.encode_text(encode_captions(caps, vocab)), dim=-1)
            hits += values[int((text @ emb).argmax())] == s.answer(attr)
        out[attr] = hits / n
    return out


# ---------------------------------------------------------------------------------------------
# Stage 3: Flamingo (frozen LM and vision; resampler, gated cross-attention, embeddings trained)
# ---------------------------------------------------------------------------------------------


def build_flamingo(lm_dir: Path, vision_path: Path, cfg: DemoConfig) -> tuple[Flamingo, Any]:
    """Our reference Flamingo around the saved LM and vision tower, OpenFlamingo's init:
    fresh resampler and cross-attention (gates 0: it starts as the LM), new token rows = mean."""
    tok = load_tokenizer(lm_dir)
    hf_config = json.loads((lm_dir / "config.json").read_text())
    lm_cfg = lm_config_from_hf(hf_config, lm_dir / "config.json")
    base_vocab = lm_cfg.vocab_size
    lm_cfg.vocab_size = len(tok)
    vision_cfg, vision_sd = read_vision(vision_path)
    fcfg = FlamingoConfig(
        vision=vision_cfg,
        lm=lm_cfg,
        resampler=ResamplerConfig(depth=cfg.resampler_depth, num_latents=cfg.num_latents),
        cross_attn=CrossAttentionConfig(every_n_layers=cfg.cross_attn_every_n_layers),
        media_token_id=tok.encode(MEDIA_TOKEN)[-1],
        eoc_token_id=tok.encode(EOC_TOKEN)[-1],
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(cfg.seed + 1)
    model = Flamingo(fcfg)
    model.vision_encoder.load_state_dict(vision_sd)
    lm_sd = {}
    for k, v in read_hf_weights(lm_dir).items():
        mapped = map_lm_key("llama", k)
        if mapped is not None:
            lm_sd[mapped] = v
    emb = lm_sd["embed_tokens.weight"]
    lm_sd["embed_tokens.weight"] = torch.cat(
        [emb, emb.mean(0, keepdim=True).expand(len(tok) - base_vocab, -1)]
    )
    lm_sd.pop("lm_head.weight", None)  # tied: the resized embedding is the head
    missing, unexpected = model.lang_model.load_state_dict(lm_sd, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith(("cross_attn_layers.", "lm_head.")) for k in missing), missing
    model.requires_grad_(False)
    for part in (
        model.perceiver,
        model.lang_model.cross_attn_layers,
        model.lang_model.embed_tokens,
    ):
        part.requires_grad_(True)
    model.eval()  # no dropout anywhere; frozen parts stay as loaded
    return model, tok


@dataclass
class FlamingoBatch:
    """A step's data: `pixels` of a pool of media, and episodes that index into the pool."""

    pixels: torch.Tensor  # (P, 3, S, S) images, or (P, F, 3, S, S) clips of F frames
    image_index: torch.Tensor  # (B, T_img) rows of `pixels`, in prompt order
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) -100 where not supervised


def episode_text(episode: Episode) -> str:
    """The training sequence: the few-shot prompt completed with the answer and <|endofchunk|>."""
    return episode.prompt() + episode.answer + EOC_TOKEN


def make_batch(rng: random.Random, tok, pool: int, episodes: int, shots: int) -> FlamingoBatch:
    """Episodes share a pool of images (one image is asked different attributes in different
    episodes), so the resampler runs once per image per step rather than once per use."""
    scenes = [sample_scene(rng, "train") for _ in range(pool)]
    rows, eps = [], []
    for _ in range(episodes):
        index = rng.sample(range(pool), shots + 1)
        attribute = rng.choice(tuple(ATTRIBUTES))
        eps.append(Episode(attribute, tuple(scenes[i] for i in index[:-1]), scenes[index[-1]]))
        rows.append(index)
    return episode_batch(tok, eps, rows, to_pixels([s.render() for s in scenes]))


def episode_batch(
    tok, episodes: Sequence[Episode], rows: list[list[int]], pixels: torch.Tensor
) -> FlamingoBatch:
    """Tokenized training sequences with OpenFlamingo's labels over a pool of media."""
    enc = tok(
        [episode_text(e) for e in episodes], padding=True, padding_side="right", return_tensors="pt"
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    # OpenFlamingo's labels: every token except padding, the first token and <image>
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    labels = labels.masked_fill(ids == tok.encode(MEDIA_TOKEN)[-1], -100)
    return FlamingoBatch(pixels, torch.tensor(rows), ids, mask, labels)


def flamingo_loss(model: Flamingo, batch: FlamingoBatch) -> torch.Tensor:
    """Next-token loss of `Flamingo.forward`, with each pool media item resampled once."""
    pixels = batch.pixels if batch.pixels.ndim == 5 else batch.pixels.unsqueeze(1)
    pool, frames = pixels.shape[:2]
    with torch.no_grad():
        _, patch_tokens = model.vision_encoder(pixels.flatten(0, 1))  # (P*F, V, Dv)
    latents = model.perceiver(patch_tokens.unflatten(0, (pool, frames)))  # (P, L, Dv)
    b, t_img = batch.image_index.shape
    cross_kv = []
    for k, v in model.lang_model.media_kv(latents):  # (P, H, L, Dh) per layer
        h, lat, dh = k.shape[1:]
        cross_kv.append(
            tuple(
                s[batch.image_index].transpose(1, 2).reshape(b, h, t_img * lat, dh) for s in (k, v)
            )
        )
    ids, mask = batch.input_ids, batch.attention_mask
    lm = model.lang_model
    logits, _ = lm(
        ids,
        mask,
        media_index_from_ids(ids, model.cfg.media_token_id),
        cross_kv,
        lm.empty_cache(b, latents.dtype),
        position_ids_from_mask(mask, ids.shape[1]),
    )
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1)
    )


def flamingo_optimizer(
    model: Flamingo, lr: float, gate_lr_scale: float = 1.0, frame_lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    """AdamW over the trainable parts; the tanh gates (scalars starting at 0, which hold every
    cross-attention output back until they open) may learn `gate_lr_scale` times faster, the
    frame embeddings (`perceiver.frame_embs`, video models) `frame_lr_scale` times faster, both
    without weight decay."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gates = [p for n, p in named if n.endswith(("attn_gate", "ff_gate"))]
    frames = [p for n, p in named if n == "perceiver.frame_embs"]
    embed = model.lang_model.embed_tokens.weight
    decay = [p for n, p in named if p.ndim >= 2 and p is not embed and n != "perceiver.frame_embs"]
    rest = [p for n, p in named if p.ndim < 2 and not n.endswith(("attn_gate", "ff_gate"))]
    rest.append(embed)
    groups = [
        {"params": decay, "weight_decay": 0.1},
        {"params": rest, "weight_decay": 0.0},
        {"params": gates, "weight_decay": 0.0, "lr_scale": gate_lr_scale},
    ]
    if frames:
        groups.append({"params": frames, "weight_decay": 0.0, "lr_scale": frame_lr_scale})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def train_flamingo(
    model: Flamingo, tok, cfg: DemoConfig, log: Callable[[str], None]
) -> list[float]:
    rng = random.Random(f"flamingo-demo/flamingo/{cfg.seed}")
    opt = flamingo_optimizer(model, cfg.flamingo_lr, cfg.gate_lr_scale)
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for step in range(cfg.flamingo_steps):
        set_lr(opt, lr_at(step, cfg.flamingo_steps, cfg.flamingo_lr))
        batch = make_batch(rng, tok, cfg.pool_images, cfg.episodes, MAX_SHOTS)
        loss = flamingo_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == cfg.flamingo_steps - 1:
            gates = [
                f"{b.attn_gate.item():+.2f}/{b.ff_gate.item():+.2f}"
                for b in model.lang_model.cross_attn_layers.values()
            ]
            log(f"flamingo step {step:4d} loss {loss.item():.4f} gates {' '.join(gates)}")
    return losses


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(
    model: Flamingo,
    tokenizer,
    episodes: Sequence[Episode],
    max_new_tokens: int = 6,
    vision_x: torch.Tensor | None = None,
) -> list[str]:
    """Greedy answers (text before `<|endofchunk|>`) for episodes with equal shot counts, on
    their images, or on `vision_x` (B, T_img, F, 3, S, S) when given (clips)."""
    from flamingo.generate import generate

    if not episodes:
        return []
    n_img = len(episodes[0].demos) + 1
    if any(len(e.demos) + 1 != n_img for e in episodes):
        raise ValueError("predict needs episodes with the same number of shots")
    if vision_x is None:
        pixels = to_pixels([im for e in episodes for im in e.images()])
        vision_x = pixels.view(len(episodes), n_img, 1, *pixels.shape[1:])
    enc = tokenizer(
        [e.prompt() for e in episodes], padding=True, padding_side="left", return_tensors="pt"
    )
    result = generate(
        model, vision_x, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens
    )
    eoc = model.cfg.eoc_token_id
    out = []
    for seq in result.sequences:
        seq = seq[: seq.index(eoc)] if eoc in seq else seq
        out.append(tokenizer.decode(seq, skip_special_tokens=True).strip())
    return out


def evaluate_by_attribute(
    model: Flamingo, tokenizer, shots: int, n: int, seed: int, batch_size: int = 50
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers on `n` held-out episodes with `shots` demos:
    ``"all"`` and per asked attribute."""
    episodes = eval_episodes(n, seed, shots)
    hits: dict[str, list[bool]] = {"all": [], **{a: [] for a in ATTRIBUTES}}
    for i in range(0, n, batch_size):
        chunk = episodes[i : i + batch_size]
        for pred, ep in zip(predict(model, tokenizer, chunk), chunk):
            hits["all"].append(pred == ep.answer)
            hits[ep.attribute].append(pred == ep.answer)
    return {k: round(sum(v) / len(v), 4) for k, v in hits.items() if v}


def evaluate(model: Flamingo, tokenizer, shots: int, n: int, seed: int) -> float:
    """Exact-match accuracy of greedy answers on `n` held-out episodes with `shots` demos."""
    return evaluate_by_attribute(model, tokenizer, shots, n, seed)["all"]


def accuracy_table(model: Flamingo, tokenizer, n: int, seed: int) -> dict[str, dict[str, float]]:
    """{shots: {"all": accuracy, attribute: accuracy, ...}} for shots 0, 1, 2, 4, 8."""
    return {str(k): evaluate_by_attribute(model, tokenizer, k, n, seed) for k in SHOTS}


def format_table(table: dict[str, dict[str, float]]) -> str:
    columns = ["all", *ATTRIBUTES]
    lines = ["shots  " + "  ".join(f"{c:>8}" for c in columns)]
    for shots, row in table.items():
        lines.append(f"{shots:>5}  " + "  ".join(f"{row.get(c, 0.0):8.1%}" for c in columns))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Saving in the real formats
# ---------------------------------------------------------------------------------------------


def save_open_clip(clip: Clip, cfg: DemoConfig, out: Path) -> Path:
    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in clip.state_dict().items()}
    path = out / "open_clip_model.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    vocab = text_vocab()
    config = {
        "model_cfg": {
            "embed_dim": cfg.embed_dim,
            "quick_gelu": True,
            "vision_cfg": {
                "image_size": IMAGE_SIZE,
                "layers": cfg.vision_layers,
                "width": cfg.vision_width,
                "head_width": cfg.vision_head_width,
                "patch_size": cfg.patch_size,
                "mlp_ratio": 4.0,
            },
            "text_cfg": {
                "context_length": TEXT_CONTEXT,
                "vocab_size": len(vocab),
                "width": cfg.text_width,
                "heads": cfg.text_heads,
                "layers": cfg.text_layers,
            },
        },
        "preprocess_cfg": {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)},
        # not open_clip's BPE: the demo's text tower reads whole words (ids = list positions)
        "demo_text_vocab": vocab,
    }
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def openflamingo_state_dict(model: Flamingo) -> dict[str, torch.Tensor]:
    """What OpenFlamingo's training save holds for this model (filter_state_dict_to_trainable):
    perceiver, gated cross-attention under the decoder layer list, input embeddings (and the
    tied `lm_head.weight` alias, listed by `state_dict()` too)."""
    layers = DECODER_LAYERS_ATTR[model.cfg.lm.family]
    state = {f"perceiver.{k}": v for k, v in model.perceiver.state_dict().items()}
    for i, block in model.lang_model.cross_attn_layers.items():
        for k, v in block.state_dict().items():
            state[f"lang_encoder.{layers}.{i}.gated_cross_attn_layer.{k}"] = v
    state["lang_encoder.model.embed_tokens.weight"] = model.lang_model.embed_tokens.weight
    state["lang_encoder.lm_head.weight"] = model.lang_model.lm_head.weight
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def save_checkpoint(model: Flamingo, out: Path) -> Path:
    from safetensors.torch import save_file

    path = out / "checkpoint.safetensors"
    save_file(openflamingo_state_dict(model), str(path), metadata={"format": "pt"})
    return path


def model_paths(root: Path) -> tuple[Path, Path, Path]:
    """(lm_dir, vision_path, checkpoint_path) of a trained demo model folder."""
    root = Path(root)
    return root / "lm", root / "open_clip_model.safetensors", root / "checkpoint.safetensors"


def load_demo(root: str | Path) -> tuple[Flamingo, Any]:
    model, tok, _ = load_flamingo(*model_paths(Path(root)))
    return model, tok


# ---------------------------------------------------------------------------------------------
# The whole recipe
# ---------------------------------------------------------------------------------------------


@dataclass
class StageRecord:
    seconds: float
    cpu_seconds: float
    first_loss: float
    last_loss: float  # mean of the last 10 steps
    extra: dict[str, Any] = field(default_factory=dict)


def _record(t0: float, c0: float, losses: list[float], **extra: Any) -> StageRecord:
    tail = losses[-10:]
    return StageRecord(
        round(time.perf_counter() - t0, 1),
        round(time.process_time() - c0, 1),
        round(losses[0], 4),
        round(sum(tail) / len(tail), 4),
        extra,
    )


STAGES = ("lm", "clip", "flamingo")


@torch.no_grad()
def lm_category_probe(lm, tok, n: int = 100, seed: int = 0) -> float:
    """Mean probability the LM gives to the right attribute's words after three text answers:
    the in-context skill the Flamingo prompts rely on (0.2 = none, 1 = perfect)."""
    rng = random.Random(f"flamingo-demo/lm-probe/{seed}")
    total = 0.0
    for _ in range(n):
        values = ATTRIBUTES[rng.choice(tuple(ATTRIBUTES))]
        text = "".join(f"Output:{rng.choice(values)}\n" for _ in range(3)) + "Output:"
        probs = lm(tok(text, return_tensors="pt")["input_ids"]).logits[0, -1].softmax(-1)
        total += probs[tok.convert_tokens_to_ids(list(values))].sum().item()
    return total / n


def run(
    out: Path, cfg: DemoConfig, log: Callable[[str], None] = print, from_stage: str = "lm"
) -> dict[str, Any]:
    """Train every stage into `out` (stages before `from_stage` are read from `out`); returns
    and writes to demo.json what happened.

    Deterministic algorithms are on while it runs: the scatter-adds of the backward pass
    (embedding rows, the pool-to-episode K/V gather) otherwise differ in the last bits from
    run to run. Same machine and thread count -> the same files, bit for bit.
    """
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _run(out, cfg, log, from_stage)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _run(out: Path, cfg: DemoConfig, log: Callable[[str], None], from_stage: str) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    lm_dir, vision_path, _ = model_paths(out)
    todo = STAGES[STAGES.index(from_stage) :]
    t_start, c_start = time.perf_counter(), time.process_time()
    stages: dict[str, StageRecord] = {}

    if "lm" in todo:
        t, c = time.perf_counter(), time.process_time()
        tok = build_tokenizer(cfg.seed, cfg.vocab_size)
        lm = build_lm(tok, cfg)
        lm_losses = train_lm(lm, tok, cfg, log)
        lm.save_pretrained(lm_dir, safe_serialization=True)
        tok.save_pretrained(lm_dir)
        probe = lm_category_probe(lm, tok, seed=cfg.eval_seed)
        log(f"lm in-context category probe: {probe:.3f}")
        stages["lm"] = _record(t, c, lm_losses, vocab=len(tok), category_probe=round(probe, 3))

    if "clip" in todo:
        t, c = time.perf_counter(), time.process_time()
        torch.manual_seed(cfg.seed + 2)
        clip = Clip(vision_config(cfg), cfg, len(text_vocab()))
        clip_losses = train_clip(clip, cfg, log)
        save_open_clip(clip, cfg, out)
        probe = clip_caption_accuracy(clip, 100, cfg.eval_seed)
        log(f"clip caption probe on held-out pairs: {probe}")
        stages["clip"] = _record(t, c, clip_losses, caption_probe=probe)

    t, c = time.perf_counter(), time.process_time()
    model, tok = build_flamingo(lm_dir, vision_path, cfg)
    flamingo_losses = train_flamingo(model, tok, cfg, log)
    checkpoint_path = save_checkpoint(model, out)
    stages["flamingo"] = _record(t, c, flamingo_losses)
    train_seconds = time.perf_counter() - t_start
    train_cpu = time.process_time() - c_start

    # the shipped files, read back the way users read them
    t = time.perf_counter()
    loaded, tok, _ = load_flamingo(lm_dir, vision_path, checkpoint_path)
    table = accuracy_table(loaded, tok, cfg.eval_n, cfg.eval_seed)
    log(f"held-out accuracy, {cfg.eval_n} episodes per row:\n{format_table(table)}")
    eval_seconds = time.perf_counter() - t
    sizes = {
        str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()
    }
    record = {
        "config": asdict(cfg),
        "stages_run": list(todo),
        "torch_threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1),
        # CPU seconds of this process: on a shared machine, wall time includes waiting
        "train_cpu_seconds": round(train_cpu, 1),
        "eval_seconds": round(eval_seconds, 1),
        "stages": {k: asdict(v) for k, v in stages.items()},
        "accuracy": {
            "n": cfg.eval_n,
            "seed": cfg.eval_seed,
            "by_shots": {k: row["all"] for k, row in table.items()},
            "by_shots_and_attribute": table,
        },
        "bytes": sum(sizes.values()),
    }
    (out / "demo.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    """Train the demo model (`--out`) or print the accuracy table of one (`--eval-only`)."""
    parser = argparse.ArgumentParser(prog="python -m demo.train", description=main.__doc__)
    parser.add_argument("--out", type=Path, help="folder to write the trained model to")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="0.01: CI smoke run")
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--model", type=Path, default=Path("models/demo"))
    parser.add_argument("--n", type=int, default=None, help="evaluation episodes per shot count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--from-stage",
        choices=STAGES,
        default="lm",
        help="development: read the earlier stages' outputs from --out instead of training them",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet = args.json

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if quiet else sys.stdout, flush=True)

    if args.eval_only:
        model, tok = load_demo(args.model)
        n = args.n or DemoConfig.eval_n
        t = time.perf_counter()
        table = accuracy_table(model, tok, n, DemoConfig.eval_seed)
        result = {
            "model": str(args.model),
            "n": n,
            "seed": DemoConfig.eval_seed,
            "by_shots": {k: row["all"] for k, row in table.items()},
            "by_shots_and_attribute": table,
            "seconds": round(time.perf_counter() - t, 1),
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"held-out accuracy, {n} episodes per row (greedy, exact match)")
            print(format_table(table))
        return 0
    if args.out is None:
        parser.error("--out is required unless --eval-only")
    cfg = DemoConfig(seed=args.seed).scaled(args.steps_scale)
    if args.n is not None:
        cfg = replace(cfg, eval_n=args.n)
    elif args.steps_scale < 1:
        cfg = replace(cfg, eval_n=20)
    record = run(args.out, cfg, log, args.from_stage)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"trained in {record['train_seconds']} s; accuracy {record['accuracy']['by_shots']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
