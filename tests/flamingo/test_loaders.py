"""Loading from the formats users have, and specific errors for every kind of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from cli.main import main
from fixtures.tiny import build_tiny_flamingo
from flamingo.loaders import LoadError, load_flamingo


def _copy(paths, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(paths.root, root)
    return root


def _load(root: Path, **kw):
    return load_flamingo(
        root / "lm", root / "open_clip_model.safetensors", root / "checkpoint.pt", **kw
    )


@pytest.mark.parametrize(
    "variant", [{"checkpoint_format": "safetensors"}, {"wrap": True}], ids=["safetensors", "ddp"]
)
@torch.no_grad()
def test_checkpoint_formats_load_identically(tiny_paths, tiny_model, variant) -> None:
    reference, *_ = tiny_model("llama")
    p = tiny_paths("llama", **variant)
    model, _, report = load_flamingo(p.lm_dir, p.vision_path, p.checkpoint_path)
    assert report.unexpected == [] and report.filled == []
    ref_sd = reference.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k


@torch.no_grad()
def test_hf_clip_directory_equals_open_clip_file(tiny_paths, tiny_model) -> None:
    reference, *_ = tiny_model("mpt")
    p = tiny_paths("mpt")
    model, _, _ = load_flamingo(p.lm_dir, p.vision_hf_dir, p.checkpoint_path)
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.encode_images(pixels), reference.encode_images(pixels), atol=1e-6)


def test_preset_and_interval(tiny_paths) -> None:
    p = tiny_paths("mpt")
    with pytest.raises(
        LoadError, match=r"cross_attn_every_n_layers=1 expects .* \[0, 1, 2, 3\].*\[1, 3\]"
    ):
        load_flamingo(p.lm_dir, p.vision_path, p.checkpoint_path, cross_attn_every_n_layers=1)
    with pytest.raises(LoadError, match="unknown preset 'nope'"):
        load_flamingo(p.lm_dir, p.vision_path, p.checkpoint_path, preset="nope")
    # OpenFlamingo-4B is GPT-NeoX with interval 2: the interval fits, the family does not
    with pytest.raises(LoadError, match="--preset OpenFlamingo-4B-vitl-rpj3b expects a gpt_neox "
                       r"LM, but .*config.json is mpt"):  # fmt: skip
        load_flamingo(
            p.lm_dir, p.vision_path, p.checkpoint_path, preset="OpenFlamingo-4B-vitl-rpj3b"
        )
    # a preset whose interval contradicts the checkpoint: the error names the preset
    interval = r"--preset OpenFlamingo-9B-vitl-mpt7b: cross_attn_every_n_layers=4 expects .* \[3\]"
    with pytest.raises(LoadError, match=interval + r", but .* \[1, 3\]"):
        load_flamingo(
            p.lm_dir, p.vision_path, p.checkpoint_path, preset="OpenFlamingo-9B-vitl-mpt7b"
        )
    # the family is checked first (before any weights): a llama LM under an mpt preset
    q = tiny_paths("llama")
    with pytest.raises(LoadError, match="--preset OpenFlamingo-9B-vitl-mpt7b expects a mpt LM"):
        load_flamingo(
            q.lm_dir, q.vision_path, q.checkpoint_path, preset="OpenFlamingo-9B-vitl-mpt7b"
        )


def test_missing_files(tiny_paths, tmp_path) -> None:
    p = tiny_paths("llama")
    with pytest.raises(LoadError, match=r"nowhere\.pt: file not found"):
        load_flamingo(p.lm_dir, p.vision_path, tmp_path / "nowhere.pt")
    with pytest.raises(LoadError, match=r"config\.json not found"):
        load_flamingo(tmp_path, p.vision_path, p.checkpoint_path)
    with pytest.raises(LoadError, match=r"vision\.bin: file not found"):
        load_flamingo(p.lm_dir, tmp_path / "vision.bin", p.checkpoint_path)


def test_truncated_files(tiny_paths, tmp_path) -> None:
    root = _copy(tiny_paths("llama"), tmp_path)
    data = (root / "checkpoint.pt").read_bytes()
    (root / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"checkpoint\.pt: cannot read weights"):
        _load(root)
    (root / "checkpoint.pt").write_bytes(data)
    data = (root / "lm" / "model.safetensors").read_bytes()
    (root / "lm" / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(LoadError, match=r"model\.safetensors: cannot read weights"):
        _load(root)


def test_unknown_family(tiny_paths, tmp_path) -> None:
    root = _copy(tiny_paths("llama"), tmp_path)
    cfg = json.loads((root / "lm" / "config.json").read_text())
    cfg["model_type"] = "bloom"
    (root / "lm" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        LoadError, match=r"config\.json: unsupported language model family .*'bloom'"
    ):
        _load(root)


def test_checkpoint_of_another_lm_width(tiny_paths, tmp_path) -> None:
    """A Flamingo checkpoint trained for a 64-wide LM, loaded with a 96-wide LM."""
    other = build_tiny_flamingo(tmp_path / "wide", "llama", hidden=96)
    p = tiny_paths("llama")
    with pytest.raises(LoadError) as err:
        load_flamingo(other.lm_dir, p.vision_path, p.checkpoint_path)
    message = str(err.value)
    assert "checkpoint.pt" in message and "has shape" in message and "expected" in message
    assert "lang_encoder." in message  # names the offending checkpoint tensor


def test_missing_required_tensor_is_named(tiny_paths, tmp_path) -> None:
    root = _copy(tiny_paths("gpt_neox"), tmp_path)
    ckpt = torch.load(root / "checkpoint.pt", weights_only=True)
    del ckpt["perceiver.layers.2.0.to_q.weight"]
    torch.save(ckpt, root / "checkpoint.pt")
    with pytest.raises(
        LoadError,
        match=r"checkpoint\.pt: 1 required tensor\(s\) missing.*perceiver\.layers\.2\.0\.to_q",
    ):
        _load(root)


def test_wrong_vision_shape_names_both_shapes(tiny_paths, tmp_path) -> None:
    root = _copy(tiny_paths("mpt"), tmp_path)
    sd = load_file(root / "open_clip_model.safetensors")
    sd["visual.ln_post.weight"] = torch.ones(7)
    save_file(sd, root / "open_clip_model.safetensors")
    with pytest.raises(
        LoadError, match=r"visual\.ln_post\.weight' has shape \(7,\), expected \(48,\)"
    ):
        _load(root)


def test_inspect_json(tiny_paths) -> None:
    p = tiny_paths("gpt_neox")
    result = CliRunner().invoke(
        main,
        ["inspect", "--lm", str(p.lm_dir), "--vision", str(p.vision_path),
         "--checkpoint", str(p.checkpoint_path), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["lm_family"] == "gpt_neox"
    assert info["cross_attn_every_n_layers"] == 2
    assert info["media_token_id"] != info["eoc_token_id"]
    n = info["num_parameters"]
    assert n["total"] == sum(v for k, v in n.items() if k != "total")


def test_cli_errors_are_clean(tiny_paths, tmp_path) -> None:
    p = tiny_paths("llama")
    result = CliRunner().invoke(
        main,
        ["inspect", "--lm", str(p.lm_dir), "--vision", str(p.vision_path),
         "--checkpoint", str(tmp_path / "missing.pt")],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "missing.pt: file not found" in result.output
    assert "Traceback" not in result.output
