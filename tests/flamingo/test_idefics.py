"""IDEFICS as configuration of the reference model: logits against transformers' own
IdeficsForVisionText2Text fed by IdeficsProcessor, on tiny random folders saved with
save_pretrained (several variants), and the loader's refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures.idefics import build_tiny_idefics
from flamingo.idefics import load_idefics
from flamingo.loaders import LoadError
from flamingo.model import position_ids_from_mask

VARIANTS = {
    # resampler with both q/k norms, scalar gates, every layer, sharded safetensors
    "resampler-qk-float-1-shards": dict(
        qk_layer_norms=True, qk_layer_norms_perceiver=True, shards=True
    ),
    # raw vision tokens, per-channel gates, every 2nd layer, decoupled vocabulary, sharded .bin
    "noresampler-vector-2-decoupled-bin": dict(
        use_resampler=False, alpha_type="vector", cross_layer_interval=2, decoupled=True,
        shards=True, safetensors=False,
    ),
    # resampler without q/k norms, decoupled, -instruct tokenizer, single safetensors file
    "resampler-vector-2-decoupled-instruct": dict(
        alpha_type="vector", cross_layer_interval=2, decoupled=True, instruct=True
    ),
    # raw vision tokens with cross-attention q/k norms, tied embeddings, single .bin
    "noresampler-qk-float-1-tied-bin": dict(
        use_resampler=False, qk_layer_norms=True, safetensors=False, tie_word_embeddings=True
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("idefics")
    return {name: build_tiny_idefics(root / name, **kw) for name, kw in VARIANTS.items()}


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (28, 28), (17, 50), (33, 33)]
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)
    ]


def prompts(eos: str = "</s>") -> list[list]:
    """Interleaved multi-image, text before the first image, an EOS that ends an image's
    reach, consecutive images, and a short row (left padding)."""
    a, b, c, d = images(4)
    return [
        ["A red", a, "circle on a", b, c, f"The cat{eos} dog sits", d, "Output:"],
        [a, "The cat"],
    ]


def hf_model_and_inputs(folder):
    from transformers import AutoProcessor, IdeficsForVisionText2Text

    hf = IdeficsForVisionText2Text.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    return hf, processor, processor(text=prompts(), return_tensors="pt")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reference_logits_match_transformers(folders, variant):
    folder = folders[variant]
    ours, _, report = load_idefics(folder)
    assert report.unexpected == []
    hf, _, inputs = hf_model_and_inputs(folder)
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    batch, num_images = pixels.shape[:2]
    # the media rule reproduces the processor's one-hot image_attention_mask
    one_hot = inputs["image_attention_mask"].long()
    hf_index = (one_hot * torch.arange(1, num_images + 1)).sum(-1)
    assert torch.equal(ours.media_index(ids), hf_index)
    assert (hf_index == 0).any() and (hf_index > 1).any()  # the prompts exercise both
    with torch.no_grad():
        expected = hf(**inputs).logits
        latents = ours.encode_images(pixels.flatten(0, 1)).unflatten(0, (batch, num_images))
        logits, _ = ours.lang_model(
            ids,
            mask,
            ours.media_index(ids),
            ours.cross_kv_for_rows(latents),
            ours.lang_model.empty_cache(batch, torch.float32),
            position_ids_from_mask(mask, ids.shape[1]),
        )
    real = mask.bool()
    assert logits.shape == expected.shape
    assert (logits - expected)[real].abs().max().item() <= 1e-5
    # the gates are open: images change the answer (the test would pass on a plain LM
    # otherwise)
    assert not torch.allclose(ours.lang_model.cross_attn_layers["0"].attn_gate, torch.zeros(1))


def test_loader_records_the_configuration(folders):
    model, tok, _ = load_idefics(folders["noresampler-vector-2-decoupled-bin"])
    cfg = model.cfg
    assert model.perceiver is None and cfg.image_tokens == 5  # 2x2 patches + CLS
    assert model.lang_model.cross_attn_layer_indices == [0, 2]
    assert cfg.lm.vocab_size == len(tok)  # decoupled rows merged into one vocabulary
    assert cfg.media_rule == "idefics" and cfg.eos_token_id == tok.eos_token_id
    assert cfg.media_token_id == tok.convert_tokens_to_ids("<image>")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"model_type": "llama"}, r"config\.json: model_type 'llama' is not an IDEFICS"),
        ({"cross_layer_interval": 3}, r"cross_layer_interval \(3\) does not divide"),
        # refused before the rotary table (2**28 floats) is built: at once, not out of memory
        ({"hidden_size": 2**31, "intermediate_size": 2**33}, r"heads of width \d+ .*corrupt"),
    ],
)
def test_refuses_configs_transformers_would_not_run_as_idefics(folders, tmp_path, change, words):
    folder = tmp_path / "edited"
    shutil.copytree(folders["resampler-vector-2-decoupled-instruct"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(LoadError, match=words):
        load_idefics(folder)


def test_refuses_a_missing_shard(folders, tmp_path):
    folder = tmp_path / "missing"
    shutil.copytree(folders["resampler-qk-float-1-shards"], folder)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(LoadError, match=rf"{shard.name}: file not found"):
        load_idefics(folder)


def test_refuses_a_shard_outside_the_folder(folders, tmp_path):
    folder = tmp_path / "outside"
    shutil.copytree(folders["resampler-qk-float-1-shards"], folder)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    data["weight_map"][key] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(LoadError, match=r"weight_map names '\.\./elsewhere\.safetensors', outside"):
        load_idefics(folder)


def test_loads_the_hub_cache_layout_of_symlinked_shards(folders, tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/ holds symlinks into ../../blobs/; the shard
    names stay inside the folder even though their targets do not."""
    source = folders["resampler-qk-float-1-shards"]
    blobs = tmp_path / "hub" / "blobs"
    snapshot = tmp_path / "hub" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        shutil.copy(f, blobs / f"{f.name}.blob")
        (snapshot / f.name).symlink_to(f"../../blobs/{f.name}.blob")
    got = load_idefics(snapshot)[0].state_dict()
    want = load_idefics(source)[0].state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_refuses_a_missing_tensor(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "incomplete"
    shutil.copytree(folders["resampler-vector-2-decoupled-instruct"], folder)
    sd = load_file(folder / "model.safetensors")
    del sd["model.gated_cross_attn_layers.1.alpha_dense"]
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LoadError, match=r"'lang_model\.cross_attn_layers\.2\.ff_gate' missing"):
        load_idefics(folder)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_plan_inventory_counts_the_real_modules(folders, variant):
    from flamingo.inspect import count
    from trt.plan import inventory

    model, _, _ = load_idefics(folders[variant])
    inv, lm = inventory(model.cfg), model.lang_model
    vision = inv["vision_encoder"]
    assert vision.params + vision.unused == count(model.vision_encoder)
    assert inv["perceiver"].params == (count(model.perceiver) if model.perceiver else 0)
    xattn = inv["cross_attention"].params + inv["cross_attention_kv"].params
    assert xattn == count(lm.cross_attn_layers)
    assert inv["language_model"].params == count(lm) - count(lm.cross_attn_layers)


def test_presets_are_the_released_sizes_and_plan():
    from click.testing import CliRunner

    from cli.main import main
    from trt.plan import inventory, preset_config

    totals = {
        name: sum(c.params for c in inventory(preset_config(name)).values())
        for name in ("idefics-9b", "idefics-9b-instruct", "idefics-80b", "idefics-80b-instruct")
    }
    assert 8.8e9 < totals["idefics-9b"] == totals["idefics-9b-instruct"] < 9.1e9
    assert 79e9 < totals["idefics-80b"] == totals["idefics-80b-instruct"] < 81e9
    runner = CliRunner()
    listed = runner.invoke(main, ["presets"]).output
    assert "idefics-80b-instruct" in listed
    args = ["plan", "--preset", "idefics-9b", "--target"]
    nano = json.loads(runner.invoke(main, [*args, "orin-nano-8gb", "--json"]).output)
    agx = json.loads(runner.invoke(main, [*args, "orin-agx-64gb", "--json"]).output)
    assert nano["fits"] is False and agx["fits"] is True


def test_openflamingo_loader_refuses_an_idefics_preset(tmp_path):
    from flamingo.loaders import resolve_cross_attn_every_n

    with pytest.raises(LoadError, match="unknown preset 'idefics-9b' for OpenFlamingo files"):
        resolve_cross_attn_every_n(None, "idefics-9b", [3], 4, tmp_path)
