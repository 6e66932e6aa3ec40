"""Tiny OpenFlamingo-style models with random weights, written in the formats users have.

Owns the test/benchmark/README fixtures: a Hugging Face causal LM directory (config.json,
model.safetensors, a fast tokenizer), an open_clip vision state dict (``visual.*`` keys beside
dummy text-tower keys) plus the same CLIP as a Hugging Face ``CLIPVisionModelWithProjection``
directory, and an OpenFlamingo ``checkpoint.pt`` holding exactly what OpenFlamingo training saves.

Layout written by :func:`build_tiny_flamingo` under ``root``::

    lm/                           LM: config.json, model.safetensors, tokenizer files
    open_clip_model.safetensors   open_clip CLIP state dict (or open_clip_model.pt)
    open_clip_config.json         open_clip model config (vision geometry, quick_gelu)
    vision_hf/                    the same tower as a transformers CLIPVisionModelWithProjection
    checkpoint.pt                 OpenFlamingo trainable state (or checkpoint.safetensors)
    tiny.json                     what was built (read back by TinyPaths.load)

Checkpoint keys (``L`` = the family's decoder-layer list, see ``DECODER_LAYERS_ATTR``)::

    perceiver.latents, perceiver.norm.*, perceiver.layers.{0..5}.{0,1}.*   resampler
    lang_encoder.L.{i}.gated_cross_attn_layer.*     for (i + 1) % cross_attn_every_n_layers == 0
    + the LM parameters whose name contains "embed" (OpenFlamingo keeps them even when frozen):
      llama     lang_encoder.model.embed_tokens.weight, lang_encoder.lm_head.weight (*)
      gpt_neox  lang_encoder.gpt_neox.embed_in.weight, lang_encoder.embed_out.weight
      mpt       lang_encoder.transformer.wte.weight (trainable), lang_encoder.lm_head.weight (tied)
      opt       lang_encoder.model.decoder.embed_tokens.weight, ...embed_positions.weight,
                lang_encoder.lm_head.weight (tied)

(*) not saved by OpenFlamingo's filter (frozen, no "embed" in the name); kept here because the
new-token rows of an untied output embedding are random at every ``resize_token_embeddings``.
Tied ``lm_head.weight`` aliases are saved, as ``state_dict()`` lists both names.

Every weight is drawn from a generator keyed by (seed, parameter name): a pure function of the
seed, independent of construction order and of transformers' own init, so a fixture is
bit-identical across runs and processes.
The checkpoint is produced by the published OpenFlamingo ``Flamingo`` class itself (open-flamingo
2.0.1, installed with ``--no-deps``), so its key layout is the real one, not our reading of it.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
import types
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

FAMILIES = ("llama", "gpt_neox", "mpt", "opt")

# Where each family keeps its decoder blocks (OpenFlamingo's decoder_layers_attr_name).
DECODER_LAYERS_ATTR = {
    "llama": "model.layers",
    "gpt_neox": "gpt_neox.layers",
    "mpt": "transformer.blocks",
    "opt": "model.decoder.layers",
}

# OpenFlamingo's special tokens, in the order factory.py adds them.
EOC_TOKEN = "<|endofchunk|>"
MEDIA_TOKEN = "<image>"
PAD_TOKEN = "<PAD>"

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Tokenizer special tokens per family: (tokens at ids 0.., bos, eos, unk, pad, prepend-bos token).
_SPECIALS = {
    # LLaMA: <unk>=0, <s>=1, </s>=2, no pad; the tokenizer prepends <s>.
    "llama": (["<unk>", "<s>", "</s>"], "<s>", "</s>", "<unk>", None, "<s>"),
    # GPT-NeoX-20B tokenizer (RedPajama-INCITE, MPT): <|endoftext|> everywhere, no pad or BOS.
    "gpt_neox": (["<|endoftext|>", "<|padding|>"], *(["<|endoftext|>"] * 3), None, None),
    "mpt": (["<|endoftext|>", "<|padding|>"], *(["<|endoftext|>"] * 3), None, None),
    # OPT: </s> doubles as BOS and is prepended; it has a pad token.
    "opt": (["<s>", "<pad>", "</s>", "<unk>"], "</s>", "</s>", "<unk>", "<pad>", "</s>"),
}

TOKENIZER_VOCAB_SIZE = 384

_CORPUS = """\
A red circle on a white background. A blue square next to a green triangle.
A small yellow star above a large black circle. Two red squares and one blue circle.
An image of a cat sitting on a mat. A dog runs in the park with a ball.
A photo of a bird on a branch. A picture of a car parked near a tree.
Output: a red circle. Output: a blue square. Output: two green triangles.
Question: What color is the circle? Short answer: red.
Question: How many squares are there? Short answer: two.
Question: What is the shape on the left? Short answer: a triangle.
Question: Is there a cat in the image? Short answer: yes.
The quick brown fox jumps over the lazy dog. The cat and the dog are friends.
There is a man riding a horse on the beach at sunset. A woman holds an umbrella in the rain.
A plate of food with rice, beans and a fork. A bowl of fruit: apples, oranges and bananas.
A train on the tracks near a station. A boat on the water under a bright sky.
This is a white image with a red shape in the middle. The shape is round and red.
The background is white and the circle is blue. The square is green and small.
Colors: red, green, blue, yellow, black, white, orange, purple, pink, brown, gray.
Shapes: circle, square, triangle, star, rectangle, line, dot, ring, cross, heart.
Numbers: one, two, three, four, five, six, seven, eight, nine, ten, 0 1 2 3 4 5 6 7 8 9.
"""


@dataclass
class TinyPaths:
    """What :func:`build_tiny_flamingo` wrote."""

    root: Path
    lm_dir: Path
    vision_path: Path
    checkpoint_path: Path
    cross_attn_every_n_layers: int
    family: str
    vision_hf_dir: Path | None = None
    vision_config_path: Path | None = None

    @classmethod
    def load(cls, root: str | Path) -> TinyPaths:
        """Read back a fixture from its ``tiny.json`` manifest."""
        root = Path(root)
        meta = json.loads((root / "tiny.json").read_text())
        return cls(
            root=root,
            lm_dir=root / meta["lm_dir"],
            vision_path=root / meta["vision_path"],
            checkpoint_path=root / meta["checkpoint_path"],
            cross_attn_every_n_layers=meta["cross_attn_every_n_layers"],
            family=meta["family"],
            vision_hf_dir=root / meta["vision_hf_dir"],
            vision_config_path=root / meta["vision_config_path"],
        )


# ---------------------------------------------------------------------------------------------
# Deterministic random weights
# ---------------------------------------------------------------------------------------------


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{key}".encode()))


def _norm_param_names(module: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in module.named_modules():
        if isinstance(mod, nn.LayerNorm) or type(mod).__name__.endswith(("RMSNorm", "LayerNorm")):
            for p_name, _ in mod.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def _random_value(name: str, shape: torch.Size, *, seed: int, is_norm: bool) -> torch.Tensor:
    """One parameter's value, a pure function of (seed, name, shape).

    Norm weights ~ 1 + 0.1 N, norm biases and other vectors ~ 0.1 N (so biases matter),
    matrices ~ N(0, 1/fan_in) (unit-scale activations, peaked logits), OpenFlamingo's perceiver
    latents ~ N(0, 1) like their torch.randn init, tanh gates uniform in [0.3, 0.9] so that
    cross-attention visibly changes the LM's output.
    """
    gen = _generator(seed, name)
    if name.endswith(("attn_gate", "ff_gate")):
        return 0.3 + 0.6 * torch.rand(shape, generator=gen)
    noise = torch.randn(shape, generator=gen)
    if name.endswith("latents"):
        return noise
    if is_norm:
        return 1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise
    if len(shape) <= 1:
        return 0.1 * noise
    fan_in = 1
    for dim in shape[1:]:
        fan_in *= dim
    return noise / fan_in**0.5


@torch.no_grad()
def _randomize(module: nn.Module, *, seed: int, namespace: str, only=None) -> None:
    """Overwrite parameters in place with name-keyed random values (``only``: name filter)."""
    norms = _norm_param_names(module)
    for name, param in module.named_parameters():
        if only is not None and not only(name):
            continue
        value = _random_value(f"{namespace}/{name}", param.shape, seed=seed, is_norm=name in norms)
        param.copy_(value.to(param.dtype))


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel alphabet), in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _train_byte_bpe(corpus: str, vocab_size: int, specials: list[str]):
    """A small deterministic byte-level BPE (ties broken by the pair's text, not hash order)."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = Counter(word for word, _ in pre.pre_tokenize_str(corpus))
    vocab: dict[str, int] = {}
    for token in [*specials, *_bytes_to_unicode().values()]:
        vocab.setdefault(token, len(vocab))
    splits = {word: list(word) for word in words}
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: Counter = Counter()
        for word, count in words.items():
            parts = splits[word]
            for pair in itertools.pairwise(parts):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for word, parts in splits.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            splits[word] = merged
    return vocab, merges


def build_tiny_tokenizer(family: str, vocab_size: int = TOKENIZER_VOCAB_SIZE):
    """A ``PreTrainedTokenizerFast`` with the family's special-token conventions."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, unk, pad, prepend = _SPECIALS[_check_family(family)]
    vocab, merges = _train_byte_bpe(_CORPUS, vocab_size, specials)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if prepend is not None:
        # Like LLaMA's (and OPT's) tokenizer: every encoded sequence starts with BOS.
        tok.post_processor = processors.TemplateProcessing(
            single=f"{prepend} $A",
            pair=f"{prepend} $A {prepend} $B",
            special_tokens=[(prepend, vocab[prepend])],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return family


# ---------------------------------------------------------------------------------------------
# Language model
# ---------------------------------------------------------------------------------------------


def _lm_config(family: str, vocab_size: int, hidden, layers, heads, kv_heads, tok, overrides):
    from transformers import GPTNeoXConfig, LlamaConfig, MptConfig, OPTConfig

    bos, eos = tok.bos_token_id, tok.eos_token_id
    if family == "llama":
        kwargs = dict(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=-(-hidden * 8 // 3 // 16) * 16,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads if kv_heads is not None else max(1, heads // 2),
            max_position_embeddings=256,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            bos_token_id=bos,
            eos_token_id=eos,
        )
        return LlamaConfig(**{**kwargs, **overrides})
    if family == "gpt_neox":
        kwargs = dict(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            rotary_pct=0.25,  # partial rotary, as Pythia / RedPajama-INCITE
            use_parallel_residual=True,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            bos_token_id=bos,
            eos_token_id=eos,
        )
        return GPTNeoXConfig(**{**kwargs, **overrides})
    if family == "mpt":
        kwargs = dict(
            d_model=hidden,
            n_heads=heads,
            n_layers=layers,
            expansion_ratio=4,
            max_seq_len=256,
            vocab_size=vocab_size,
            no_bias=True,
            attn_config={"alibi": True},
            tie_word_embeddings=True,
            use_cache=True,
            bos_token_id=bos,
            eos_token_id=eos,
        )
        return MptConfig(**{**kwargs, **overrides})
    kwargs = dict(  # opt
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=4 * hidden,
        num_attention_heads=heads,
        max_position_embeddings=256,
        word_embed_proj_dim=hidden,
        do_layer_norm_before=True,
        dropout=0.0,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
    )
    return OPTConfig(**{**kwargs, **overrides})


def build_tiny_lm(
    out_dir: str | Path,
    family: str,
    *,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int | None = None,
    seed: int = 0,
    **overrides,
) -> Path:
    """Write a random causal LM of ``family`` plus its tokenizer to ``out_dir``.

    ``kv_heads`` (LLaMA only) defaults to ``heads // 2`` (grouped-query attention);
    ``overrides`` go to the transformers config. The vocabulary is ``len(tokenizer)``.
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tok = build_tiny_tokenizer(family)
    if kv_heads is not None and family != "llama":
        raise ValueError("kv_heads is only supported for the llama family")
    config = _lm_config(family, len(tok), hidden, layers, heads, kv_heads, tok, overrides)
    model = AutoModelForCausalLM.from_config(config)
    _randomize(model, seed=seed, namespace=f"lm/{family}")
    model.tie_weights()
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Vision encoder (open_clip layout + Hugging Face CLIP)
# ---------------------------------------------------------------------------------------------


def clip_hf_to_open_clip(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a transformers CLIP vision tower to open_clip's ``visual.*`` keys.

    Accepts ``CLIPVisionModelWithProjection`` / ``CLIPModel`` state dicts (``vision_model.*`` and
    ``visual_projection.weight``; text-tower keys are ignored). Separate q/k/v projections become
    ``nn.MultiheadAttention``'s packed ``in_proj_*`` (q, k, v order) and the projection is stored
    as open_clip's ``proj`` = ``visual_projection.weight.T`` (``[width, embed_dim]``).
    """
    sd = {k.removeprefix("vision_model."): v for k, v in hf_state_dict.items()}
    out = {
        "visual.conv1.weight": sd["embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["embeddings.class_embedding"],
        "visual.positional_embedding": sd["embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["pre_layrnorm.bias"],
    }
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(n_layers):
        src, dst = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        attn = src + "self_attn."
        out[dst + "ln_1.weight"] = sd[src + "layer_norm1.weight"]
        out[dst + "ln_1.bias"] = sd[src + "layer_norm1.bias"]
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [sd[attn + f"{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0
            )
            out[dst + f"attn.out_proj.{kind}"] = sd[attn + f"out_proj.{kind}"]
            out[dst + f"ln_2.{kind}"] = sd[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = sd[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = sd[src + f"mlp.fc2.{kind}"]
    out["visual.ln_post.weight"] = sd["post_layernorm.weight"]
    out["visual.ln_post.bias"] = sd["post_layernorm.bias"]
    out["visual.proj"] = sd["visual_projection.weight"].t()
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _dummy_text_tower(embed_dim: int, *, seed: int) -> dict[str, torch.Tensor]:
    """A few keys of a full open_clip CLIP's text tower, so loaders must select ``visual.*``."""
    shapes = {
        "token_embedding.weight": (64, embed_dim),
        "positional_embedding": (8, embed_dim),
        "ln_final.weight": (embed_dim,),
        "ln_final.bias": (embed_dim,),
        "text_projection": (embed_dim, embed_dim),
        "logit_scale": (),
    }
    return {
        k: _random_value(f"clip_text/{k}", torch.Size(s), seed=seed, is_norm="ln_" in k)
        for k, s in shapes.items()
    }


def build_tiny_vision(
    path: str | Path,
    *,
    image_size: int = 32,
    patch: int = 8,
    width: int = 64,
    layers: int = 2,
    heads: int = 4,
    embed_dim: int = 32,
    seed: int = 0,
    quick_gelu: bool = True,
    fmt: str = "safetensors",
) -> Path:
    """Write a random CLIP vision tower as an open_clip state dict at ``path``.

    Beside it: ``open_clip_config.json`` (open_clip's hub config format) and ``vision_hf/``,
    the same weights as a transformers ``CLIPVisionModelWithProjection`` directory.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if fmt not in ("safetensors", "pt"):
        raise ValueError(f"fmt must be 'safetensors' or 'pt', not {fmt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        projection_dim=embed_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch,
        hidden_act="quick_gelu" if quick_gelu else "gelu",
        layer_norm_eps=1e-5,
    )
    model = CLIPVisionModelWithProjection(config)
    _randomize(model, seed=seed, namespace="clip_vision")
    model.eval()
    model.save_pretrained(path.parent / "vision_hf", safe_serialization=True)

    state = {**clip_hf_to_open_clip(model.state_dict()), **_dummy_text_tower(embed_dim, seed=seed)}
    _save_state_dict(state, path, fmt)
    open_clip_config = {
        "model_cfg": {
            "embed_dim": embed_dim,
            "quick_gelu": quick_gelu,
            "vision_cfg": {
                "image_size": image_size,
                "layers": layers,
                "width": width,
                "head_width": width // heads,
                "patch_size": patch,
                "mlp_ratio": 4.0,
            },
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": embed_dim},
        },
        "preprocess_cfg": {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)},
    }
    (path.parent / "open_clip_config.json").write_text(json.dumps(open_clip_config, indent=2))
    return path


def _save_state_dict(state: dict[str, torch.Tensor], path: Path, fmt: str) -> None:
    # Own storage per tensor: tied weights share storage, which safetensors refuses and
    # torch.save would serialize whole (views of a larger storage).
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save(state, path)


# ---------------------------------------------------------------------------------------------
# OpenFlamingo checkpoint
# ---------------------------------------------------------------------------------------------


def import_open_flamingo():
    """``(Flamingo, FlamingoLMMixin, extend_instance)`` from the published package.

    ``open_flamingo/__init__`` imports ``open_clip`` (which needs torchvision) only for
    ``create_model_and_transforms``; when open_clip is not installed an empty module stands in.
    """
    if "open_clip" not in sys.modules and importlib.util.find_spec("open_clip") is None:
        sys.modules["open_clip"] = types.ModuleType("open_clip")
    try:
        from open_flamingo.src.flamingo import Flamingo
        from open_flamingo.src.flamingo_lm import FlamingoLMMixin
        from open_flamingo.src.utils import extend_instance
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "building a tiny OpenFlamingo checkpoint needs the published package: "
            "pip install --no-deps open-flamingo==2.0.1 einops einops-exts"
        ) from err
    return Flamingo, FlamingoLMMixin, extend_instance


class _HFVisionTokens(nn.Module):
    """open_clip ``visual`` stand-in: ``forward(pixels) -> (pooled, patch_tokens)``."""

    def __init__(self, clip_vision: nn.Module):
        super().__init__()
        self.clip = clip_vision

    def forward(self, pixels: torch.Tensor):
        out = self.clip(pixel_values=pixels)
        return out.image_embeds, out.last_hidden_state[:, 1:]


def add_flamingo_tokens(tokenizer) -> None:
    """Extend a tokenizer in place exactly like open_flamingo/src/factory.py."""
    tokenizer.add_special_tokens({"additional_special_tokens": [EOC_TOKEN, MEDIA_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


def filter_state_dict_to_trainable(model: nn.Module, state_dict: dict) -> dict:
    """Same logic as open_flamingo.train.train_utils.filter_state_dict_to_trainable.

    (That module imports wandb, hence the copy.) Drops frozen parameters except any whose name
    contains ``embed``; keeps buffers; drops the duplicate ``old_decoder_blocks`` /
    ``gated_cross_attn_layers`` aliases and the vision encoder.
    """
    for name, param in model.named_parameters():
        if "fsdp" in name or "embed" in name:
            continue
        if not param.requires_grad:
            state_dict.pop(name.replace("._checkpoint_wrapped_module", ""), None)
    for name in list(state_dict):
        if (
            "lang_encoder.old_decoder_blocks" in name
            or "lang_encoder.gated_cross_attn_layers" in name
            or "vision_encoder" in name
        ):
            del state_dict[name]
    return state_dict


def _flamingo_state(
    lm_dir: Path,
    vision_hf_dir: Path,
    family: str,
    n: int,
    seed: int,
    perturb_embeddings: bool,
) -> dict[str, torch.Tensor]:
    """Build the published Flamingo from the files, randomize it, return the training save."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModelWithProjection

    Flamingo, FlamingoLMMixin, extend_instance = import_open_flamingo()
    tokenizer = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    base_vocab = len(tokenizer)
    add_flamingo_tokens(tokenizer)
    lang = AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True)
    extend_instance(lang, FlamingoLMMixin)
    lang.set_decoder_layers_attr_name(DECODER_LAYERS_ATTR[family])
    lang.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows re-drawn below
    clip = CLIPVisionModelWithProjection.from_pretrained(vision_hf_dir, local_files_only=True)
    vision = nn.Module()
    vision.visual = _HFVisionTokens(clip)
    model = Flamingo(
        vision,
        lang,
        tokenizer.encode(EOC_TOKEN)[-1],
        tokenizer.encode(MEDIA_TOKEN)[-1],
        vis_dim=clip.config.hidden_size,
        cross_attn_every_n_layers=n,
    )
    # Trainability exactly as factory.py (freeze_lm_embeddings=False).
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)

    # Flamingo's own parameters: perceiver and gated cross-attention.
    _randomize(
        model,
        seed=seed,
        namespace="flamingo",
        only=lambda k: k.startswith("perceiver.") or ".gated_cross_attn_layer." in k,
    )
    with torch.no_grad():
        # New token rows (<|endofchunk|>, <image>, maybe <PAD>) of the input/output embeddings;
        # HF's resize draws them from the global RNG, so make them seeded here.
        emb_in = lang.get_input_embeddings().weight
        emb_out = lang.get_output_embeddings().weight
        tables = {"input": emb_in} | ({} if emb_out is emb_in else {"output": emb_out})
        for which, table in tables.items():
            rows = _random_value(
                f"flamingo/new_rows/{which}", table[base_vocab:].shape, seed=seed, is_norm=False
            )
            table[base_vocab:] = rows
        if perturb_embeddings:
            # Training updates every input-embedding row (freeze_lm_embeddings=False), so the
            # checkpoint's rows differ from the LM file's: loaders must take the checkpoint's.
            drift = _random_value(
                "flamingo/embedding_drift", emb_in.shape, seed=seed, is_norm=False
            )
            emb_in[:base_vocab] += 0.1 * drift[:base_vocab]

    state = filter_state_dict_to_trainable(model, model.state_dict())
    # Untied output embeddings (LLaMA's lm_head) are frozen and have no "embed" in their name,
    # so OpenFlamingo's filter drops them -- yet their new-token rows are random at every resize.
    # Keep them so that the fixture defines one model (parity needs the <|endofchunk|> logit).
    out_name = next(n for n, p in lang.named_parameters() if p is emb_out)
    out_key = f"lang_encoder.{out_name}"
    if out_key not in state:
        state[out_key] = emb_out
    return state


def read_flamingo_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``checkpoint.pt`` (plain or DDP-wrapped) or ``.safetensors``.

    Independent of flamingo.loaders on purpose: the oracle must not share our reading of files.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "model_state_dict" in state:
        state = state["model_state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_open_flamingo(
    lm_dir: str | Path,
    vision_hf_dir: str | Path,
    checkpoint_path: str | Path,
    cross_attn_every_n_layers: int,
):
    """``(Flamingo, tokenizer)``: the published OpenFlamingo model built from files, eval mode.

    The oracle of the parity tests and the baseline of the benchmarks, assembled the way
    ``open_flamingo/src/factory.py`` does, minus open_clip: the vision tower is transformers'
    ``CLIPVisionModelWithProjection`` (``vision_hf_dir``) behind a ``.visual`` returning
    open_clip <= 2.22's ``(pooled, patch tokens before ln_post)``; the LM is
    ``AutoModelForCausalLM`` (no ``trust_remote_code``) extended with ``FlamingoLMMixin``, its
    decoder-layer attribute found by the package's own ``_infer_decoder_layers_attr_name``; the
    tokenizer gets ``<|endofchunk|>``, ``<image>`` (and ``<PAD>``) and pads on the left, as
    OpenFlamingo's evaluation does; the checkpoint loads with ``strict=False`` and unexpected
    keys are an error. Nothing of our reference model or loaders is used.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModelWithProjection

    Flamingo, FlamingoLMMixin, extend_instance = import_open_flamingo()
    from open_flamingo.src.factory import _infer_decoder_layers_attr_name

    tokenizer = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    add_flamingo_tokens(tokenizer)
    tokenizer.padding_side = "left"

    lang_encoder = AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True)
    extend_instance(lang_encoder, FlamingoLMMixin)
    lang_encoder.set_decoder_layers_attr_name(_infer_decoder_layers_attr_name(lang_encoder))
    lang_encoder.resize_token_embeddings(len(tokenizer))

    clip = CLIPVisionModelWithProjection.from_pretrained(vision_hf_dir, local_files_only=True)
    vision = nn.Module()
    vision.visual = _HFVisionTokens(clip)
    model = Flamingo(
        vision,
        lang_encoder,
        tokenizer.encode(EOC_TOKEN)[-1],
        tokenizer.encode(MEDIA_TOKEN)[-1],
        vis_dim=clip.config.hidden_size,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
    )
    result = model.load_state_dict(read_flamingo_checkpoint(checkpoint_path), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{checkpoint_path}: unexpected checkpoint keys {result.unexpected_keys}")
    # Flamingo's own weights exist only in the checkpoint ("gated_cross_attn_layers." aliases
    # of the loaded ".gated_cross_attn_layer." tensors are reported missing; they are not).
    unloaded = [k for k in result.missing_keys if "perceiver." in k or "_attn_layer." in k]
    if unloaded:
        raise ValueError(f"{checkpoint_path}: checkpoint lacks Flamingo weights {unloaded}")
    model.eval()
    return model, tokenizer


def build_tiny_flamingo(
    root: str | Path,
    family: str,
    *,
    cross_attn_every_n_layers: int = 2,
    seed: int = 0,
    checkpoint_format: str = "pt",
    wrap: bool = False,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int | None = None,
    image_size: int = 32,
    patch: int = 8,
    vision_width: int = 48,
    vision_layers: int = 2,
    vision_heads: int = 4,
    embed_dim: int = 32,
    quick_gelu: bool = True,
    vision_format: str = "safetensors",
    perturb_embeddings: bool = True,
    lm_overrides: dict | None = None,
) -> TinyPaths:
    """Build LM + vision + OpenFlamingo checkpoint under ``root`` (see the module docstring).

    The vision width (48) differs from the LM width (64) on purpose, as in every released model,
    so that a mixed-up dimension fails loudly.
    ``checkpoint_format``: ``"pt"`` (torch.save of the plain state dict, like the released
    ``checkpoint.pt``) or ``"safetensors"``. ``wrap=True`` (pt only) writes a DDP training save:
    ``{"model_state_dict": {"module." + key: tensor}}``.
    """
    _check_family(family)
    if checkpoint_format not in ("pt", "safetensors"):
        raise ValueError(
            f"checkpoint_format must be 'pt' or 'safetensors', not {checkpoint_format!r}"
        )
    if wrap and checkpoint_format != "pt":
        raise ValueError("wrap=True (a DDP training save) needs checkpoint_format='pt'")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lm_dir = build_tiny_lm(
        root / "lm",
        family,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        seed=seed,
        **(lm_overrides or {}),
    )
    suffix = "safetensors" if vision_format == "safetensors" else "pt"
    vision_path = build_tiny_vision(
        root / f"open_clip_model.{suffix}",
        image_size=image_size,
        patch=patch,
        width=vision_width,
        layers=vision_layers,
        heads=vision_heads,
        embed_dim=embed_dim,
        seed=seed,
        quick_gelu=quick_gelu,
        fmt=vision_format,
    )
    vision_hf_dir = root / "vision_hf"
    state = _flamingo_state(
        lm_dir, vision_hf_dir, family, cross_attn_every_n_layers, seed, perturb_embeddings
    )
    checkpoint_path = root / f"checkpoint.{checkpoint_format}"
    if wrap:
        # open_flamingo.train.train_utils.save_checkpoint under DDP (keys carry "module.").
        wrapped = {f"module.{k}": v.detach().clone().contiguous() for k, v in state.items()}
        training_save = {
            "epoch": 0,
            "model_state_dict": wrapped,
            "optimizer_state_dict": {"state": {}, "param_groups": []},
            "lr_scheduler_state_dict": {},
        }
        torch.save(training_save, checkpoint_path)
    else:
        _save_state_dict(state, checkpoint_path, checkpoint_format)

    paths = TinyPaths(
        root=root,
        lm_dir=lm_dir,
        vision_path=vision_path,
        checkpoint_path=checkpoint_path,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
        family=family,
        vision_hf_dir=vision_hf_dir,
        vision_config_path=root / "open_clip_config.json",
    )
    manifest = {
        k: (str(v.relative_to(root)) if isinstance(v, Path) else v)
        for k, v in asdict(paths).items()
        if k != "root"
    }
    manifest.update(
        seed=seed,
        checkpoint_format=checkpoint_format,
        wrap=wrap,
        perturb_embeddings=perturb_embeddings,
    )
    (root / "tiny.json").write_text(json.dumps(manifest, indent=2))
    return paths


def main(argv: list[str] | None = None) -> None:
    """``python -m flamingo.tiny OUT --family llama``: build a fixture and print its paths."""
    parser = argparse.ArgumentParser(prog="python -m flamingo.tiny", description=main.__doc__)
    parser.add_argument("out", type=Path, help="directory to write")
    parser.add_argument("--family", choices=FAMILIES, default="mpt")
    parser.add_argument("--cross-attn-every-n-layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-format", choices=("pt", "safetensors"), default="pt")
    parser.add_argument("--wrap", action="store_true", help="DDP-style {'model_state_dict'} save")
    args = parser.parse_args(argv)
    paths = build_tiny_flamingo(
        args.out,
        args.family,
        cross_attn_every_n_layers=args.cross_attn_every_n_layers,
        seed=args.seed,
        checkpoint_format=args.checkpoint_format,
        wrap=args.wrap,
    )
    for key, value in asdict(paths).items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
