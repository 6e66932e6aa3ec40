"""Model files are checked at the boundary, before the model is built: every config (LM
config.json, shard index, open_clip_config.json, HF CLIP config) and option, with errors
naming the file and key; weights are floating and finite; what the files do not say is
reported as an assumption with the flag that overrides it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from cli.main import main
from flamingo.loaders import LoadError, load_flamingo, read_state_dict


@pytest.fixture
def root(tiny_paths, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(tiny_paths("llama").root, out)
    return out


def _load(root: Path, vision: Path | None = None, **kw):
    return load_flamingo(
        root / "lm", vision or root / "open_clip_model.safetensors", root / "checkpoint.pt", **kw
    )


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


LM_CONFIGS = [
    ("not-utf8", b"\xff\xfe{", r"config\.json: not UTF-8"),
    ("list", b"[1, 2]", r"config\.json: expected a JSON object, got list"),
    ("invalid", b"{oops", r"config\.json: invalid JSON"),
    ("hidden-str", {"hidden_size": "64"}, r"config\.json: hidden_size: expected an integer"),
    ("layers-zero", {"num_hidden_layers": 0}, r"num_hidden_layers: must be >= 1"),
    ("eps-negative", {"rms_norm_eps": -1}, r"rms_norm_eps: must be > 0"),
    ("rope-bogus", {"rope_scaling": {"rope_type": "bogus", "factor": 2.0}},
     r"rope_scaling\.rope_type 'bogus' is not a known RoPE type"),
    ("rope-dynamic", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     r"'dynamic' depends on the sequence length"),
    ("rope-list", {"rope_scaling": [1]}, r"rope_scaling: expected an object or a null"),
    ("heads-split", {"num_attention_heads": 3, "head_dim": None},
     r"num_attention_heads \(3\) does not divide hidden_size \(64\)"),
    ("kv-heads-split", {"num_key_value_heads": 3},
     r"num_key_value_heads \(3\) does not divide num_attention_heads \(4\)"),
    ("huge-heads", {"hidden_size": 2**31, "num_attention_heads": 4, "head_dim": None},
     r"attention heads of width 536870912 \(hidden size / heads\); at most 1024"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "change", "words"), LM_CONFIGS, ids=[c[0] for c in LM_CONFIGS])
def test_lm_config_checked(root, name, change, words) -> None:
    path = root / "lm" / "config.json"
    if isinstance(change, bytes):
        path.write_bytes(change)
    else:
        _edit_json(path, lambda d: d.update(change))
    with pytest.raises(LoadError, match=words):
        _load(root)


def test_shard_index_checked(root) -> None:
    lm = root / "lm"
    (lm / "model.safetensors").rename(lm / "shard-1.safetensors")
    index = lm / "model.safetensors.index.json"
    for content, words in (
        ("{oops", "invalid JSON"),
        ("{}", "missing required key 'weight_map'"),
        ('{"weight_map": []}', "weight_map: expected an object"),
        ('{"weight_map": {"a": "../../etc/passwd"}}', "outside"),
        ('{"weight_map": {"a": "missing.safetensors"}}', r"missing\.safetensors: file not found"),
    ):
        index.write_text(content)
        with pytest.raises(LoadError, match=words):
            _load(root)
    index.write_text(json.dumps({"weight_map": {"x": "shard-1.safetensors"}}))
    _load(root)  # a good index loads


def test_open_clip_config_checked_and_contradictions_refused(root) -> None:
    config = root / "open_clip_config.json"
    good = config.read_text()
    for change, words in (
        ([1], "expected a JSON object, got list"),
        ({"model_cfg": {"vision_cfg": {"width": 48, "head_width": 0}}},
         r"model_cfg\.vision_cfg\.head_width: must be >= 1"),
        ({"model_cfg": {"vision_cfg": {"width": 48, "head_width": 10}}},
         "head_width 10 does not divide width 48"),
        ({"model_cfg": {"vision_cfg": {"width": 96, "head_width": 24}}},
         r"model_cfg\.vision_cfg\.width = 96, but the tensors .* give 48"),
        ({"model_cfg": {"quick_gelu": "yes"}}, r"model_cfg\.quick_gelu: expected a boolean"),
    ):  # fmt: skip
        config.write_text(json.dumps(change))
        with pytest.raises(LoadError, match=words):
            _load(root)
    config.write_text(good)
    heads = json.loads(good)["model_cfg"]["vision_cfg"]
    said = heads["width"] // heads["head_width"]
    with pytest.raises(LoadError, match=f"--vision-heads {said * 2} contradicts .*{said}"):
        _load(root, vision_heads=said * 2)
    with pytest.raises(LoadError, match=r"--vision-act gelu contradicts .*quick_gelu"):
        _load(root, vision_act="gelu")
    _, _, report = _load(root, vision_heads=said, vision_act="quick_gelu")  # agreeing is fine
    assert not any("vision heads" in a or "activation" in a for a in report.assumptions)


def test_options_checked(root) -> None:
    for kw, words in (
        ({"cross_attn_every_n_layers": 0}, "--cross-attn-every-n-layers must be >= 1, got 0"),
        ({"vision_heads": -2}, "--vision-heads must be >= 1, got -2"),
        ({"vision_act": "relu"}, "--vision-act must be quick_gelu or gelu"),
    ):
        with pytest.raises(LoadError, match=words):
            _load(root, **kw)
    (root / "open_clip_config.json").unlink()  # no config: the option alone decides
    with pytest.raises(LoadError, match="5 vision heads do not divide the vision width 48"):
        _load(root, vision_heads=5)


def test_bare_open_clip_weights_report_assumptions(root, tiny_paths) -> None:
    """Without open_clip_config.json the heads and activation are assumed and said, with the
    flag that overrides each; the CLI prints them."""
    (root / "open_clip_config.json").unlink()
    _, _, report = _load(root)
    text = "\n".join(report.assumptions)
    assert "--vision-heads" in text and "--vision-act" in text
    assert "--vision-tokens-after-ln-post" in text
    result = CliRunner().invoke(main, ["inspect", "--lm", str(root / "lm"), "--vision",
                                       str(root / "open_clip_model.safetensors"),
                                       "--checkpoint", str(root / "checkpoint.pt")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "assumed: vision heads = width / 64" in result.output
    _, _, report = load_flamingo(*(tiny_paths("llama").__dict__[k] for k in
                                   ("lm_dir", "vision_path", "checkpoint_path")))  # fmt: skip
    assert not any("--vision-heads" in a for a in report.assumptions)  # the config says


def test_hf_clip_directory_checked(tiny_paths, root) -> None:
    hf = root / "vision_hf"
    good = (hf / "config.json").read_text()
    _edit_json(hf / "config.json", lambda d: d.update(vision_config=[1]))
    with pytest.raises(LoadError, match="vision_config: expected an object"):
        _load(root, vision=hf)
    (hf / "config.json").write_text(good)
    sd = load_file(hf / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "patch_embedding" not in k}, hf / "model.safetensors")
    with pytest.raises(LoadError, match=r"missing CLIP vision tensor .*patch_embedding"):
        _load(root, vision=hf)


@pytest.mark.parametrize("bad", ["nan", "inf", "int32", "bool"])
@pytest.mark.parametrize("where", ["checkpoint", "lm", "vision"])
def test_weights_must_be_floating_and_finite(root, bad, where) -> None:
    """rel-12's kind, in each of the three weight files: named file and tensor."""
    if where == "checkpoint":
        path, key = root / "checkpoint.pt", "perceiver.latents"
        sd = torch.load(path, weights_only=True)
    elif where == "lm":
        path, key = root / "lm" / "model.safetensors", "model.layers.0.mlp.up_proj.weight"
        sd = load_file(path)
    else:
        path, key = root / "open_clip_model.safetensors", "visual.ln_pre.weight"
        sd = load_file(path)
    t = sd[key]
    if bad in ("nan", "inf"):
        t = t.clone()
        t.view(-1)[t.numel() // 2] = float(bad)
    else:
        t = (t * 1000).to(torch.int32 if bad == "int32" else torch.bool)
    sd[key] = t
    torch.save(sd, path) if path.suffix == ".pt" else save_file(sd, path)
    words = "non-finite values" if bad in ("nan", "inf") else f"dtype {bad}, expected a floating"
    with pytest.raises(LoadError, match=f"{path.name}: tensor '{key}' .*{words}"):
        _load(root)


@pytest.mark.parametrize(
    "args",
    [["--cross-attn-every-n-layers", "0"], ["--vision-heads", "3"], ["--vision-heads", "-2"]],
)
def test_export_command_refuses_bad_model_options_cleanly(tiny_paths, tmp_path, args) -> None:
    p = tiny_paths("llama")
    files = ["--lm", str(p.lm_dir), "--vision", str(p.vision_path), "--checkpoint",
             str(p.checkpoint_path)]  # fmt: skip
    result = CliRunner().invoke(main, ["export", *files, "-o", str(tmp_path / "o"), *args])
    assert result.exit_code == 1 and "Error: --" in result.output, result.output
    assert isinstance(result.exception, SystemExit)
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("precision", ["fp32", "int4"])  # int4: the streamed route
def test_export_says_which_checkpoint_tensors_it_ignored(tiny_paths, tmp_path, precision) -> None:
    """A tensor the model has no place for (a renamed or mistyped key) is named by export as
    by inspect, on the fp32 and the streamed route alike."""
    p = tiny_paths("llama")
    sd = read_state_dict(p.checkpoint_path)
    sd["junk"] = torch.zeros(3)
    checkpoint = tmp_path / "extra.safetensors"
    save_file(sd, checkpoint)
    files = ["--lm", str(p.lm_dir), "--vision", str(p.vision_path), "--checkpoint",
             str(checkpoint)]  # fmt: skip
    args = ["export", *files, "-o", str(tmp_path / "o"), "--precision", precision]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"unexpected: {checkpoint}:junk" in result.output


@pytest.mark.parametrize("family", ["llama", "mpt"])
def test_a_missing_tensor_is_named_as_the_files_name_it(tiny_paths, tmp_path, family) -> None:
    p = tiny_paths(family)
    sd = read_state_dict(p.checkpoint_path)
    key = next(k for k in sd if k.endswith(".gated_cross_attn_layer.attn.to_kv.weight"))
    del sd[key]
    checkpoint = tmp_path / "incomplete.safetensors"
    save_file(sd, checkpoint)
    with pytest.raises(LoadError, match=rf"1 required tensor\(s\) missing, e\.g\. '{key}'$"):
        load_flamingo(p.lm_dir, p.vision_path, checkpoint)
