"""The demo task, its training recipe and the shipped demo model (models/demo)."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from demo import train as td
from demo.task import (
    ANSWERS,
    ATTRIBUTES,
    HELD_OUT_PAIRS,
    IMAGE_SIZE,
    POSITIONS,
    Episode,
    eval_episodes,
    sample_episode,
    sample_scene,
)
from runtime.prompts import count_media

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "demo"
GOAL_4_SHOT = 0.90  # issue 6
DOCUMENTED_4_SHOT = 0.95  # README: held-out 4-shot accuracy of the shipped model, 200 episodes


# ---------------------------------------------------------------------------------------------
# Task generator
# ---------------------------------------------------------------------------------------------


def test_generator_is_seeded() -> None:
    a = [sample_scene(random.Random("s"), "train") for _ in range(3)]
    b = [sample_scene(random.Random("s"), "train") for _ in range(3)]
    assert a == b
    assert [s.render().tobytes() for s in a] == [s.render().tobytes() for s in b]
    assert sample_scene(random.Random("t")) != a[0]
    assert eval_episodes(5, seed=3) == eval_episodes(5, seed=3)
    assert eval_episodes(5, seed=3) != eval_episodes(5, seed=4)


def test_answers_are_distinct_so_one_demo_names_the_attribute() -> None:
    assert len(set(ANSWERS)) == len(ANSWERS) == sum(len(v) for v in ATTRIBUTES.values())


def test_rendered_scene_shows_its_attributes() -> None:
    rng = random.Random(0)
    for _ in range(50):
        scene = sample_scene(rng, "any")
        im = np.asarray(scene.render(), dtype=np.int16)
        assert im.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        assert len(scene.centres) == ["one", "two", "three", "four"].index(scene.count) + 1
        strip = IMAGE_SIZE / len(POSITIONS)
        lo = POSITIONS.index(scene.position) * strip
        for cx, cy in scene.centres:
            assert lo + scene.radius <= cx + 1 and cx - 1 <= lo + strip - scene.radius
            # the shape's colour at its centre (every shape covers its centre)
            assert np.abs(im[int(cy), int(cx)] - scene.rgb).max() <= 2
        ys = sorted(cy for _, cy in scene.centres)
        assert all(b - a >= 2 * scene.radius for a, b in itertools.pairwise(ys))  # no overlaps
        # away from the shapes: background
        xs = [x for x in range(IMAGE_SIZE) if not lo - 1 <= x <= lo + strip + 1]
        assert np.abs(im[:, xs] - scene.background).max() == 0


def test_training_never_sees_held_out_pairs_and_evaluation_only_queries_them() -> None:
    rng = random.Random(1)
    assert not {sample_scene(rng, "train").pair for _ in range(2000)} & HELD_OUT_PAIRS
    batch = td.make_batch(rng, _FakeTok(), pool=16, episodes=4, shots=3)
    assert batch.image_index.shape == (4, 4)
    episodes = eval_episodes(100, seed=0)
    assert {e.query.pair for e in episodes} == set(HELD_OUT_PAIRS)
    assert {e.attribute for e in episodes} == set(ATTRIBUTES)


def test_episode_attribute_is_consistent_and_only_in_the_demonstrations() -> None:
    rng = random.Random(2)
    seen = set()
    for _ in range(200):
        ep = sample_episode(rng, 4)
        seen.add(ep.attribute)
        assert all(s.answer(ep.attribute) in ATTRIBUTES[ep.attribute] for s in ep.demos)
        assert ep.answer in ATTRIBUTES[ep.attribute]
    assert seen == set(ATTRIBUTES)
    # one image, five questions: the query text is the same, only the demonstrations differ
    scene = sample_scene(random.Random(3))
    demos = tuple(sample_scene(random.Random(f"d{i}")) for i in range(2))
    episodes = [Episode(a, demos, scene) for a in ATTRIBUTES]
    assert len({e.answer for e in episodes}) == len(ATTRIBUTES)
    assert len({e.prompt() for e in episodes}) == len(ATTRIBUTES)
    assert all(e.truncated(0).prompt() == "<image>Output:" for e in episodes)


def test_prompt_is_openflamingo_caption_format_and_eval_shots_are_nested() -> None:
    full = eval_episodes(3, seed=0, shots=8)
    four = eval_episodes(3, seed=0, shots=4)
    for f, e in zip(full, four):
        assert e.query == f.query and e.demos == f.demos[:4] and e.answer == f.answer
        assert count_media(e.prompt()) == 5 and len(e.images()) == 5
        demo = e.demos[0].answer(e.attribute)
        assert e.prompt().startswith(f"<image>Output:{demo}<|endofchunk|>\n<image>Output:")
        assert e.prompt().endswith("<|endofchunk|>\n<image>Output:")


def test_written_episode_is_what_the_runtime_prompts(tmp_path: Path) -> None:
    from demo.task import write_episode
    from runtime.prompts import build_few_shot_prompt, load_demos_jsonl

    ep = eval_episodes(1, seed=0, shots=3)[0]
    folder = write_episode(ep, tmp_path / "ep")
    demos = load_demos_jsonl(folder / "demos.jsonl")
    prompt, images = build_few_shot_prompt(demos, task="caption", query_image=folder / "query.png")
    assert prompt == ep.prompt() == json.loads((folder / "episode.json").read_text())["prompt"]
    rendered = [np.asarray(im) for im in ep.images()]
    assert all(np.array_equal(np.asarray(Image.open(p)), r) for p, r in zip(images, rendered))


class _FakeTok:
    """Enough of a tokenizer for make_batch's bookkeeping (one id per character)."""

    def __call__(self, texts, **_):
        n = max(map(len, texts))
        ids = torch.tensor([[ord(c) for c in t] + [0] * (n - len(t)) for t in texts])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    def encode(self, text):
        return [ord(text[-1])]


# ---------------------------------------------------------------------------------------------
# Training recipe (tiny sizes, a few steps)
# ---------------------------------------------------------------------------------------------

TINY = replace(
    td.DemoConfig(),
    lm_hidden=32,
    lm_layers=2,
    lm_heads=2,
    lm_kv_heads=1,
    lm_steps=10,
    lm_lr=1e-2,
    lm_batch=4,
    lm_seq=32,
    vision_width=32,
    vision_layers=1,
    vision_head_width=16,
    embed_dim=16,
    text_width=16,
    text_layers=1,
    text_heads=1,
    clip_steps=3,
    clip_batch=8,
    resampler_depth=1,
    num_latents=4,
    cross_attn_every_n_layers=2,
    pool_images=8,
    episodes=4,
)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float], list[float]]:
    """LM and CLIP stages at tiny size, saved in the real formats."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("demo")
    tok = td.build_tokenizer(0, TINY.vocab_size)
    lm = td.build_lm(tok, TINY)
    lm_losses = td.train_lm(lm, tok, TINY, log=lambda _: None)
    lm.save_pretrained(out / "lm", safe_serialization=True)
    tok.save_pretrained(out / "lm")
    clip = td.Clip(td.vision_config(TINY), TINY, len(td.text_vocab()))
    clip_losses = td.train_clip(clip, TINY, log=lambda _: None)
    td.save_open_clip(clip, TINY, out)
    return out, lm_losses, clip_losses


def test_tokenizer_has_single_token_answers_and_openflamingo_specials(tiny_demo) -> None:
    from flamingo.loaders import load_tokenizer

    tok = load_tokenizer(tiny_demo[0] / "lm")
    assert all(len(tok.tokenize(a)) == 1 for a in ANSWERS)
    assert tok.pad_token == "<PAD>" and tok.padding_side == "left"
    assert tok.additional_special_tokens == ["<|endofchunk|>", "<image>"]
    ids = tok("<image>Output:red<|endofchunk|>")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1] == tok.convert_tokens_to_ids("<image>")


def test_lm_pretraining_reduces_loss(tiny_demo) -> None:
    _, lm_losses, clip_losses = tiny_demo
    assert lm_losses[-1] < lm_losses[0] - 0.5, lm_losses  # starts at ln(vocab) ~ 6
    assert all(np.isfinite(clip_losses))


def test_flamingo_steps_reduce_loss_and_train_only_flamingo_parts(tiny_demo) -> None:
    out = tiny_demo[0]
    model, tok = td.build_flamingo(out / "lm", out / "open_clip_model.safetensors", TINY)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    batch = td.make_batch(random.Random(0), tok, TINY.pool_images, TINY.episodes, shots=3)
    opt = td.flamingo_optimizer(model, 3e-3)
    losses = []
    for _ in range(8):
        loss = td.flamingo_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, frozen[k])}
    assert any(k.startswith("perceiver.") for k in changed)
    assert any(".cross_attn_layers." in k for k in changed)
    assert all(
        k.startswith(("perceiver.", "lang_model.cross_attn_layers.", "lang_model.embed_tokens."))
        or k == "lang_model.lm_head.weight"  # tied to embed_tokens
        for k in changed
    ), changed

    # the same loss as Flamingo.forward on the episodes' own images (pool sharing is exact)
    with torch.no_grad():
        vision_x = batch.pixels[batch.image_index].unsqueeze(2)
        logits = model(vision_x, batch.input_ids, batch.attention_mask)
        ref = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1)
        )
        torch.testing.assert_close(td.flamingo_loss(model, batch), ref, rtol=1e-5, atol=1e-5)

    # saved in OpenFlamingo's layout, read back by load_flamingo as the same model
    td.save_checkpoint(model, out)
    loaded, _ = td.load_demo(out)
    assert loaded.cfg.resampler == model.cfg.resampler
    with torch.no_grad():
        torch.testing.assert_close(loaded(vision_x, batch.input_ids, batch.attention_mask), logits)


# ---------------------------------------------------------------------------------------------
# The shipped model
# ---------------------------------------------------------------------------------------------


def test_shipped_files_are_the_real_formats_and_small() -> None:
    files = [p for p in MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (MODEL_DIR / "lm").iterdir()
    }
    oc = json.loads((MODEL_DIR / "open_clip_config.json").read_text())["model_cfg"]
    assert oc["quick_gelu"] is True and oc["vision_cfg"]["head_width"] == 64
    with safe_open(str(MODEL_DIR / "open_clip_model.safetensors"), "pt") as f:
        assert any(k.startswith("visual.transformer.resblocks.") for k in f.keys())  # noqa: SIM118
    with safe_open(str(MODEL_DIR / "checkpoint.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lang_encoder.model.embed_tokens.weight" in keys
    assert "lang_encoder.lm_head.weight" in keys
    assert any(k.startswith("perceiver.layers.") for k in keys)
    assert all(
        k.startswith(("perceiver.", "lang_encoder.model.embed_tokens.", "lang_encoder.lm_head."))
        or ".gated_cross_attn_layer." in k
        for k in keys
    )


@pytest.fixture(scope="module")
def shipped():
    return td.load_demo(MODEL_DIR)


@pytest.mark.slow
def test_shipped_model_reaches_documented_accuracy_at_4_shots(shipped) -> None:
    model, tok = shipped
    assert model.cfg.lm.vocab_size == len(tok)
    acc = td.evaluate(model, tok, shots=4, n=200, seed=td.DemoConfig.eval_seed)
    # greedy answers are deterministic here; 2 points of slack for another CPU's float rounding
    assert acc >= max(GOAL_4_SHOT, DOCUMENTED_4_SHOT - 0.02), acc


def test_shipped_model_needs_the_demonstrations(shipped) -> None:
    model, tok = shipped
    assert td.evaluate(model, tok, shots=0, n=100, seed=td.DemoConfig.eval_seed) <= 0.3


@pytest.mark.slow
def test_eval_only_command_prints_the_table(capsys: pytest.CaptureFixture) -> None:
    threads = torch.get_num_threads()
    try:
        assert td.main(["--eval-only", "--model", str(MODEL_DIR), "--n", "10", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets the training default of 2
    result = json.loads(capsys.readouterr().out)
    assert list(result["by_shots"]) == ["0", "1", "2", "4", "8"]
    assert set(result["by_shots_and_attribute"]["4"]) <= {"all", *ATTRIBUTES}


@torch.no_grad()
def test_shipped_checkpoint_is_openflamingos_and_computes_the_same(shipped) -> None:
    """The published OpenFlamingo (open-flamingo 2.0.1) loads the shipped checkpoint with no
    unexpected key and gives our logits on a held-out 4-shot batch. Its Flamingo always builds
    the default resampler (depth 6, 64 latents), so the demo's smaller one is swapped in first;
    its vision tower is ours (vision parity is tested on the tiny models)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from flamingo.oracle import import_open_flamingo

    model, tok = shipped
    Flamingo, mixin, extend_instance = import_open_flamingo()
    from open_flamingo.src.factory import _infer_decoder_layers_attr_name as layers_attr
    from open_flamingo.src.helpers import PerceiverResampler

    lang = AutoModelForCausalLM.from_pretrained(MODEL_DIR / "lm", local_files_only=True)
    extend_instance(lang, mixin)
    lang.set_decoder_layers_attr_name(layers_attr(lang))
    lang.resize_token_embeddings(len(tok))
    vision = torch.nn.Module()
    vision.visual = model.vision_encoder
    ref = Flamingo(
        vision,
        lang,
        model.cfg.eoc_token_id,
        model.cfg.media_token_id,
        vis_dim=model.cfg.vision.width,
        cross_attn_every_n_layers=model.cfg.cross_attn.every_n_layers,
    )
    r = model.cfg.resampler
    ref.perceiver = PerceiverResampler(
        dim=model.cfg.vision.width, depth=r.depth, num_latents=r.num_latents
    )
    result = ref.load_state_dict(load_file(MODEL_DIR / "checkpoint.safetensors"), strict=False)
    assert result.unexpected_keys == []
    assert not [k for k in result.missing_keys if "perceiver." in k or "_attn_layer." in k]
    ref.eval()

    episodes = eval_episodes(4, seed=td.DemoConfig.eval_seed, shots=4)
    pixels = td.to_pixels([im for e in episodes for im in e.images()])
    vision_x = pixels.view(len(episodes), 5, 1, *pixels.shape[1:])
    enc = tok([e.prompt() for e in episodes], return_tensors="pt")  # equal lengths: no padding
    ours = model(vision_x, enc["input_ids"], enc["attention_mask"])
    theirs = ref(vision_x, enc["input_ids"], enc["attention_mask"]).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
