"""The tiny fixtures (fixtures/tiny.py) are in the real formats, and the OpenFlamingo oracle runs.

Also guards the oracle's behaviour under the installed transformers: forward and generate are
deterministic, batch-invariant under left padding, equal with and without the KV cache, and
images change only the tokens after the first ``<image>``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fixtures.tiny import (
    FAMILIES,
    TinyPaths,
    build_tiny_flamingo,
    build_tiny_vision,
    main,
)
from flamingo.config import DECODER_LAYERS_ATTR
from flamingo.loaders import clip_hf_to_open_clip
from tests.oracle import load_checkpoint, load_oracle

HIDDEN, VISION_WIDTH, N_LAYERS, EVERY_N = 64, 48, 4, 2
PERCEIVER_DEPTH, XATTN_INNER = 6, 8 * 64  # fixed by OpenFlamingo's Flamingo class

# Per family: model_type, and the LM keys OpenFlamingo's checkpoint filter keeps.
FAMILY_SPEC = {
    "llama": ("llama", ["model.embed_tokens.weight", "lm_head.weight"]),
    "gpt_neox": ("gpt_neox", ["gpt_neox.embed_in.weight", "embed_out.weight"]),
    "mpt": ("mpt", ["transformer.wte.weight", "lm_head.weight"]),
    "opt": (
        "opt",
        [
            "model.decoder.embed_tokens.weight",
            "model.decoder.embed_positions.weight",
            "lm_head.weight",
        ],
    ),
}
PROMPTS = ["<image>A red circle<|endofchunk|><image>A blue", "<image>Output:"]


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory) -> dict[str, TinyPaths]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_flamingo(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def oracles(fixtures):
    return {family: load_oracle(paths) for family, paths in fixtures.items()}


def _images(batch: int, n_images: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n_images, 1, 3, 32, 32, generator=gen)  # (B, T_img, F, C, H, W)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_dir_is_a_plain_hf_model(fixtures, family):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    lm_dir = fixtures[family].lm_dir
    config = AutoConfig.from_pretrained(lm_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    assert config.model_type == FAMILY_SPEC[family][0]
    assert config.vocab_size == len(tokenizer)
    weights = load_file(str(lm_dir / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True)
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key

    ids = tokenizer("A red circle").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "A red circle"
    if family == "llama":
        assert ids[0] == tokenizer.bos_token_id == 1 and tokenizer.eos_token == "</s>"
        assert config.num_key_value_heads < config.num_attention_heads  # GQA
        assert not config.tie_word_embeddings
        assert tokenizer.pad_token is None
    elif family in ("gpt_neox", "mpt"):
        assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
        assert tokenizer.bos_token_id not in ids and tokenizer.pad_token is None
    else:
        assert ids[0] == tokenizer.bos_token_id and tokenizer.pad_token == "<pad>"
    if family == "gpt_neox":
        assert config.rotary_pct == 0.25 and config.use_parallel_residual
    if family == "mpt":
        assert config.attn_config.alibi and config.no_bias and config.tie_word_embeddings


def test_open_clip_file_layout(fixtures):
    from safetensors.torch import load_file

    paths = fixtures["mpt"]
    state = load_file(str(paths.vision_path))
    cfg = json.loads(paths.vision_config_path.read_text())["model_cfg"]
    width, grid = cfg["vision_cfg"]["width"], 32 // cfg["vision_cfg"]["patch_size"]
    assert width == VISION_WIDTH and cfg["quick_gelu"]
    visual = {k: tuple(v.shape) for k, v in state.items() if k.startswith("visual.")}
    expected = {
        "visual.conv1.weight": (width, 3, 8, 8),
        "visual.class_embedding": (width,),
        "visual.positional_embedding": (grid * grid + 1, width),
        "visual.ln_pre.weight": (width,),
        "visual.ln_pre.bias": (width,),
        "visual.ln_post.weight": (width,),
        "visual.ln_post.bias": (width,),
        "visual.proj": (width, cfg["embed_dim"]),
    }
    for i in range(cfg["vision_cfg"]["layers"]):
        block = f"visual.transformer.resblocks.{i}."
        for name, shape in {
            "ln_1.weight": (width,),
            "ln_1.bias": (width,),
            "attn.in_proj_weight": (3 * width, width),
            "attn.in_proj_bias": (3 * width,),
            "attn.out_proj.weight": (width, width),
            "attn.out_proj.bias": (width,),
            "ln_2.weight": (width,),
            "ln_2.bias": (width,),
            "mlp.c_fc.weight": (4 * width, width),
            "mlp.c_fc.bias": (4 * width,),
            "mlp.c_proj.weight": (width, 4 * width),
            "mlp.c_proj.bias": (width,),
        }.items():
            expected[block + name] = shape
    assert visual == expected  # exact key set: e.g. no conv1.bias
    text_keys = set(state) - set(visual)
    assert {"token_embedding.weight", "text_projection", "positional_embedding"} <= text_keys


def _open_clip_visual(state, pixels, *, heads, quick_gelu):
    """open_clip VisionTransformer(output_tokens=True) of open_clip <= 2.22, from its keys."""
    conv = state["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]

    def norm(x, name):
        return F.layer_norm(x, (width,), state[name + ".weight"], state[name + ".bias"], 1e-5)

    x = F.conv2d(pixels, conv, stride=patch).flatten(2).transpose(1, 2)  # (B, grid*grid, width)
    cls = state["visual.class_embedding"].expand(x.shape[0], 1, width)
    x = norm(torch.cat([cls, x], dim=1) + state["visual.positional_embedding"], "visual.ln_pre")
    n_layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.")})
    for i in range(n_layers):
        p = f"visual.transformer.resblocks.{i}."
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict(
            {k.removeprefix(p + "attn."): v for k, v in state.items() if k.startswith(p + "attn.")}
        )
        h = norm(x, p + "ln_1")
        x = x + attn(h, h, h, need_weights=False)[0]
        h = F.linear(norm(x, p + "ln_2"), state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h) if quick_gelu else F.gelu(h)
        x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
    pooled = norm(x[:, 0], "visual.ln_post") @ state["visual.proj"]
    return pooled, x[:, 1:]  # tokens before ln_post


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_clip_hf_to_open_clip_matches_hf_numerically(tmp_path, quick_gelu):
    from transformers import CLIPVisionModelWithProjection

    path = build_tiny_vision(
        tmp_path / "open_clip_model.pt", width=48, quick_gelu=quick_gelu, fmt="pt"
    )
    state = torch.load(path, weights_only=True)
    cfg = json.loads((tmp_path / "open_clip_config.json").read_text())["model_cfg"]
    assert cfg["quick_gelu"] is quick_gelu
    hf = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "vision_hf").eval()
    assert hf.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")

    converted = {f"visual.{k}": v for k, v in clip_hf_to_open_clip(hf.state_dict()).items()}
    assert set(converted) == {k for k in state if k.startswith("visual.")}
    for key, value in converted.items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(converted["visual.proj"], hf.visual_projection.weight.t())

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    heads = cfg["vision_cfg"]["width"] // cfg["vision_cfg"]["head_width"]
    with torch.no_grad():
        pooled, tokens = _open_clip_visual(state, pixels, heads=heads, quick_gelu=quick_gelu)
        out = hf(pixel_values=pixels)
    assert tokens.shape == (2, 16, 48)
    torch.testing.assert_close(tokens, out.last_hidden_state[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, out.image_embeds, atol=1e-5, rtol=1e-5)


def _perceiver_keys(dim: int) -> dict[str, tuple]:
    keys = {
        "perceiver.latents": (64, dim),
        "perceiver.norm.weight": (dim,),
        "perceiver.norm.bias": (dim,),
    }
    for i in range(PERCEIVER_DEPTH):
        p = f"perceiver.layers.{i}."
        keys.update({
            p + "0.norm_media.weight": (dim,), p + "0.norm_media.bias": (dim,),
            p + "0.norm_latents.weight": (dim,), p + "0.norm_latents.bias": (dim,),
            p + "0.to_q.weight": (XATTN_INNER, dim), p + "0.to_kv.weight": (2 * XATTN_INNER, dim),
            p + "0.to_out.weight": (dim, XATTN_INNER),
            p + "1.0.weight": (dim,), p + "1.0.bias": (dim,),
            p + "1.1.weight": (4 * dim, dim), p + "1.3.weight": (dim, 4 * dim),
        })  # fmt: skip
    return keys


def _gated_keys(prefix: str, dim: int, vis_dim: int) -> dict[str, tuple]:
    p = prefix + ".gated_cross_attn_layer."
    return {
        p + "attn.norm.weight": (dim,), p + "attn.norm.bias": (dim,),
        p + "attn.to_q.weight": (XATTN_INNER, dim),
        p + "attn.to_kv.weight": (2 * XATTN_INNER, vis_dim),
        p + "attn.to_out.weight": (dim, XATTN_INNER), p + "attn_gate": (1,),
        p + "ff.0.weight": (dim,), p + "ff.0.bias": (dim,),
        p + "ff.1.weight": (4 * dim, dim), p + "ff.3.weight": (dim, 4 * dim), p + "ff_gate": (1,),
    }  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_holds_exactly_what_openflamingo_training_saves(fixtures, family):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    paths = fixtures[family]
    state = torch.load(paths.checkpoint_path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # a plain state dict
    layers = DECODER_LAYERS_ATTR[family]
    n_vocab = len(AutoTokenizer.from_pretrained(paths.lm_dir)) + (3 if family != "opt" else 2)
    expected = _perceiver_keys(VISION_WIDTH)
    for i in range(N_LAYERS):
        if (i + 1) % EVERY_N == 0:  # inserted before decoder layer i
            expected.update(_gated_keys(f"lang_encoder.{layers}.{i}", HIDDEN, VISION_WIDTH))
    for key in FAMILY_SPEC[family][1]:
        rows = 256 + 2 if "embed_positions" in key else n_vocab
        expected[f"lang_encoder.{key}"] = (rows, HIDDEN)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected

    gates = torch.cat([v for k, v in state.items() if k.endswith(("attn_gate", "ff_gate"))])
    assert len(gates) == 2 * N_LAYERS // EVERY_N and bool(((gates > 0.3) & (gates < 0.9)).all())

    # Trained input embeddings differ from the LM file's; frozen lm_head rows do not.
    lm = load_file(str(paths.lm_dir / "model.safetensors"))
    emb_key = FAMILY_SPEC[family][1][0]
    base = lm[emb_key].shape[0]
    assert not torch.allclose(state[f"lang_encoder.{emb_key}"][:base], lm[emb_key])
    if family == "llama":
        assert torch.equal(state["lang_encoder.lm_head.weight"][:base], lm["lm_head.weight"])
    if family in ("mpt", "opt"):  # tied: the lm_head alias is saved too
        assert torch.equal(state["lang_encoder.lm_head.weight"], state[f"lang_encoder.{emb_key}"])


def test_checkpoint_formats_and_determinism(tmp_path, fixtures):
    from safetensors.torch import load_file

    plain = torch.load(fixtures["llama"].checkpoint_path, weights_only=True)
    wrapped_paths = build_tiny_flamingo(tmp_path / "wrapped", "llama", wrap=True)
    raw = torch.load(wrapped_paths.checkpoint_path, weights_only=True)
    assert set(raw["model_state_dict"]) == {"module." + k for k in plain}
    st_paths = build_tiny_flamingo(tmp_path / "st", "llama", checkpoint_format="safetensors")
    assert st_paths.checkpoint_path.name == "checkpoint.safetensors"
    for other in (
        load_checkpoint(wrapped_paths.checkpoint_path),
        load_file(str(st_paths.checkpoint_path)),
    ):
        assert other.keys() == plain.keys()
        assert all(torch.equal(other[k], plain[k]) for k in plain)
    for rel in (
        "lm/model.safetensors",
        "lm/tokenizer.json",
        "open_clip_model.safetensors",
        "vision_hf/model.safetensors",
    ):
        assert (fixtures["llama"].root / rel).read_bytes() == (st_paths.root / rel).read_bytes()
    other_seed = build_tiny_flamingo(tmp_path / "seed1", "llama", seed=1)
    assert not torch.equal(
        torch.load(other_seed.checkpoint_path)["perceiver.latents"], plain["perceiver.latents"]
    )
    with pytest.raises(ValueError):
        build_tiny_flamingo(tmp_path / "bad", "llama", wrap=True, checkpoint_format="safetensors")


def test_manifest_and_cli(tmp_path, capsys, fixtures):
    assert TinyPaths.load(fixtures["opt"].root) == fixtures["opt"]
    main([str(tmp_path / "cli"), "--family", "gpt_neox", "--cross-attn-every-n-layers", "1"])
    out = capsys.readouterr().out
    assert f"checkpoint_path: {tmp_path / 'cli' / 'checkpoint.pt'}" in out
    paths = TinyPaths.load(tmp_path / "cli")
    assert paths.family == "gpt_neox" and paths.cross_attn_every_n_layers == 1
    gated = {k for k in torch.load(paths.checkpoint_path) if "gated_cross_attn_layer" in k}
    assert {k.split(".")[3] for k in gated} == {"0", "1", "2", "3"}


# ---------------------------------------------------------------------------------------------
# Oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_is_built_from_the_files(fixtures, oracles, family):
    model, tokenizer = oracles[family]
    state = load_checkpoint(fixtures[family].checkpoint_path)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert model.lang_encoder.decoder_layers_attr_name == DECODER_LAYERS_ATTR[family]
    special = tokenizer.additional_special_tokens
    assert special == ["<|endofchunk|>", "<image>"]
    assert model.media_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert model.eoc_token_id == tokenizer.convert_tokens_to_ids("<|endofchunk|>")
    assert model.lang_encoder.get_input_embeddings().weight.shape[0] == len(tokenizer)


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_forward_is_deterministic_and_uses_images(oracles, family):
    model, tokenizer = oracles[family]
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert batch.attention_mask[1, 0] == 0  # left padded
    images = _images(2, 2)
    with torch.no_grad():
        logits = model(images, batch.input_ids, attention_mask=batch.attention_mask).logits
        again = model(images, batch.input_ids, attention_mask=batch.attention_mask).logits
        swapped = model(images.flip(1), batch.input_ids, attention_mask=batch.attention_mask).logits
    assert logits.shape == (*batch.input_ids.shape, len(tokenizer))
    assert torch.equal(logits, again)
    assert (logits - swapped)[0].abs().amax() > 1e-2  # cross-attention matters

    # Text before the first <image> attends to no image: images cannot change it.
    text = tokenizer(["A photo<image>of a cat"], return_tensors="pt")
    first = text.input_ids[0].tolist().index(model.media_token_id)
    with torch.no_grad():
        a = model(_images(1, 1, seed=1), text.input_ids).logits
        b = model(_images(1, 1, seed=2), text.input_ids).logits
    torch.testing.assert_close(a[:, :first], b[:, :first], atol=0, rtol=0)
    assert (a[:, first:] - b[:, first:]).abs().amax() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_generate_left_padding_cache_and_beams(oracles, family):
    model, tokenizer = oracles[family]
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    single = tokenizer(PROMPTS[1:], return_tensors="pt")
    images = _images(2, 2)
    kwargs = dict(max_new_tokens=6, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        greedy = model.generate(
            images, batch.input_ids, attention_mask=batch.attention_mask, **kwargs
        )
        again = model.generate(
            images, batch.input_ids, attention_mask=batch.attention_mask, **kwargs
        )
        no_cache = model.generate(
            images, batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **kwargs
        )
        alone = model.generate(
            images[1:, :1], single.input_ids, attention_mask=single.attention_mask, **kwargs
        )
        beams = model.generate(
            images, batch.input_ids, attention_mask=batch.attention_mask, num_beams=3, **kwargs
        )
    prompt_len = batch.input_ids.shape[1]
    assert torch.equal(greedy[:, :prompt_len], batch.input_ids)
    assert greedy.shape[1] > prompt_len
    assert torch.equal(greedy, again)
    assert torch.equal(greedy, no_cache)  # cached media locations == recomputed ones
    # The padded row generates what the prompt generates alone (left padding is invisible).
    n_alone = alone.shape[1] - single.input_ids.shape[1]
    assert greedy[1, prompt_len : prompt_len + n_alone].tolist() == alone[0, -n_alone:].tolist()
    assert beams.shape[0] == 2 and torch.equal(beams[:, :prompt_len], batch.input_ids)
    assert not model.lang_encoder.is_conditioned()  # generate() clears the conditioning
