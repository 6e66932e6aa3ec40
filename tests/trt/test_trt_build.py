"""TensorRT build and runtime. Without TensorRT (CI): profile derivation, engines.json schema,
validation and mismatch errors, the missing-TensorRT error, and the step model's device buffer
protocol run against onnxruntime through a stand-in executor. With TensorRT and a GPU: a real
build of the tiny export and its parity with onnxruntime (skipped here, with the reason)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main
from runtime.engine import OnnxFlamingo
from runtime.engines import (
    ENGINES_NAME,
    DeviceInfo,
    EngineMismatchError,
    check_against_device,
    load_engines_manifest,
)
from runtime.generation import GenerationConfig, generate
from runtime.manifest import load_manifest
from runtime.pipeline import FlamingoPipeline
from runtime.spec import ModelDims
from tests.trt.stand_in import DEVICE, fake_build, stand_in_engine
from trt.build import make_build_plan
from trt.device import TensorRTUnavailableError
from trt.engine import TrtFlamingo
from trt.profiles import (
    DEFAULT_MAX_BATCH,
    EXTEND_TOKENS,
    Limits,
    ProfileError,
    check_consistency,
    decoder_profiles,
    graph_profiles,
)

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None

# ---------------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------------


def _dims(tiny_export, family: str = "llama") -> tuple[ModelDims, dict]:
    manifest = load_manifest(tiny_export(family), verify_hashes=False)
    return ModelDims.from_config(manifest.model), manifest.limits


def test_default_profiles_from_manifest_limits(tiny_export) -> None:
    dims, limits = _dims(tiny_export)
    assert limits["max_seq_len"] == 256  # the tiny LM's context: opt would equal max
    lim = Limits.resolve({**limits, "max_seq_len": 2048})  # an export declaring 2048
    assert lim.to_dict() == {
        "max_batch": DEFAULT_MAX_BATCH, "max_images": 32, "max_seq_len": 2048, "max_frames": 1
    }  # fmt: skip
    (vision,) = graph_profiles("vision", dims, lim)  # images only: no clip profile
    assert vision.dims["num_images"].to_list() == [1, 5, 32]
    assert vision.dims["num_frames"].to_list() == [1, 1, 1]
    prefill, extend, decode = graph_profiles("decoder", dims, lim)
    assert (prefill.name, extend.name, decode.name) == ("prefill", "extend", "decode")
    r = {k: v.to_list() for k, v in prefill.dims.items()}
    assert r == {
        "batch": [1, 1, 1],
        "sequence": [1, 256, 2048],
        "past_sequence": [0, 0, 0],
        "total_sequence": [1, 256, 2048],
        "media_keys": [64, 320, 2048],  # latents .. max_images x latents
        "logits_positions": [1, 1, 2048],  # generation: the last; parity: every position
    }
    r = {k: v.to_list() for k, v in decode.dims.items()}
    assert r["sequence"] == [1, 1, 1] and r["past_sequence"] == [0, 256, 2047]
    assert r["total_sequence"] == [1, 257, 2048] and r["logits_positions"] == [1, 1, 1]
    r = {k: v.to_list() for k, v in extend.dims.items()}
    assert r["sequence"] == [1, 16, EXTEND_TOKENS]
    assert r["past_sequence"] == [1, 256, 2048 - EXTEND_TOKENS]
    assert r["logits_positions"] == [1, 1, EXTEND_TOKENS]


@pytest.mark.parametrize("seq", [1, 2, 3, 4, 5, 17, 100, 2048])
@pytest.mark.parametrize("batch", [1, 3])
def test_profiles_are_consistent_for_any_limits(tiny_export, seq: int, batch: int) -> None:
    dims, _ = _dims(tiny_export)
    profiles = decoder_profiles(dims, Limits(batch, 2, seq))
    assert profiles[0].name == "prefill" and profiles[-1].name == "decode"
    for p in profiles:
        assert check_consistency(p) == [], p
        assert p.dims["batch"].max == batch and p.dims["total_sequence"].max <= seq
    # every (past, new) a generation can meet is covered by some profile, chunking aside
    for past in range(seq):
        covered = [
            p
            for p in profiles
            if p.dims["past_sequence"].min <= past <= p.dims["past_sequence"].max
            and p.dims["sequence"].min <= 1
        ]
        assert covered, past


def test_limits_may_be_lowered_not_raised(tiny_export) -> None:
    _, limits = _dims(tiny_export)
    assert Limits.resolve(limits, 3, 4, 128).to_dict() == {
        "max_batch": 3,
        "max_images": 4,
        "max_seq_len": 128,
        "max_frames": 1,
    }
    with pytest.raises(ProfileError, match="exceeds the export's max_seq_len 256"):
        Limits.resolve(limits, max_seq_len=512)
    with pytest.raises(ProfileError, match="--max-batch must be >= 1"):
        Limits.resolve(limits, max_batch=0)


def test_build_plan_covers_every_input_of_both_graphs(tiny_export) -> None:
    for family in ("llama", "gpt_neox", "mpt"):
        manifest = load_manifest(tiny_export(family), verify_hashes=False)
        plan = make_build_plan(manifest, "orin-nano-8gb", max_batch=3, max_seq_len=128)
        assert plan.workspace_bytes == 512 << 20 and plan.target.name == "orin-nano-8gb"
        for graph in ("vision", "decoder"):
            spec = manifest.graphs[graph].spec
            for record in plan.shapes(manifest, graph):
                assert set(record["shapes"]) == set(spec.input_names)
                for name, (lo, opt, hi) in record["shapes"].items():
                    assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), name
        dec = {r["name"]: r for r in plan.shapes(manifest, "decoder")}
        assert dec["decode"]["shapes"]["past_key_values.0.key"][2][0] == 3  # max batch
        assert dec["prefill"]["shapes"]["attention_mask"][2] == [3, 128]
    assert make_build_plan(manifest).workspace_bytes == 1 << 30  # no target: 1 GiB


# ---------------------------------------------------------------------------------------------
# engines.json
# ---------------------------------------------------------------------------------------------


def test_engines_json_round_trip_and_schema(tiny_export, tmp_path: Path) -> None:
    out = fake_build(tiny_export("mpt"), tmp_path / "out", max_batch=2)
    data = json.loads((out / ENGINES_NAME).read_text())
    assert data["schema_version"] == 1 and data["tensorrt_version"] == "10.3.0"
    assert data["device"] == {"name": "Stand-in GPU", "compute_capability": "8.7"}
    assert data["limits"] == {"max_batch": 2, "max_images": 32, "max_seq_len": 256, "max_frames": 1}
    assert data["target"] == "orin-nano-8gb" and data["strongly_typed"] is True
    manifest = load_manifest(out)
    assert data["engines"]["decoder"]["source"] == {"decoder.onnx": manifest.files["decoder.onnx"]}
    names = [p["name"] for p in data["engines"]["decoder"]["profiles"]]
    assert names == ["prefill", "extend", "decode"]
    engines = load_engines_manifest(out)
    assert engines.to_dict() == data
    assert engines.engines["decoder"].profile_index("decode") == 2
    assert not list(out.glob(".*.tmp"))  # atomic write left nothing behind


def test_engines_json_validation_errors(tiny_export, tmp_path: Path) -> None:
    out = fake_build(tiny_export("mpt"), tmp_path / "out")
    path = out / ENGINES_NAME
    good = json.loads(path.read_text())

    def load_with(change) -> None:
        data = json.loads(json.dumps(good))
        change(data)
        path.write_text(json.dumps(data))
        load_engines_manifest(out)

    with pytest.raises(EngineMismatchError, match="schema_version 7"):
        load_with(lambda d: d.update(schema_version=7))
    with pytest.raises(EngineMismatchError, match=r"engines \['vision'\] missing"):
        load_with(lambda d: d["engines"].pop("vision"))
    with pytest.raises(EngineMismatchError, match="needs 'prefill' and 'decode'"):
        load_with(lambda d: d["engines"]["decoder"]["profiles"].pop())
    with pytest.raises(EngineMismatchError, match=r"device\.compute_capability missing"):
        load_with(lambda d: d["device"].pop("compute_capability"))
    with pytest.raises(EngineMismatchError, match="invalid"):
        load_with(lambda d: d.pop("limits"))
    path.write_text(json.dumps(good))
    with open(out / "decoder.engine", "ab") as f:
        f.write(b"x")
    with pytest.raises(EngineMismatchError, match=r"decoder\.engine.*sha256"):
        load_engines_manifest(out)
    path.unlink()
    with pytest.raises(EngineMismatchError, match=r"no engines\.json; build the engines"):
        load_engines_manifest(out)


def test_engines_must_match_the_export(tiny_export, tmp_path: Path) -> None:
    from runtime.engines import check_against_export

    out = fake_build(tiny_export("llama"), tmp_path / "out")
    engines, manifest = load_engines_manifest(out), load_manifest(out)
    check_against_export(engines, manifest, out)
    engines.engines["vision"].source["vision.onnx"] = "0" * 64  # built from another export
    with pytest.raises(EngineMismatchError, match=r"vision\.engine was built from other ONNX"):
        check_against_export(engines, manifest, out)
    engines = load_engines_manifest(out)
    engines.limits["max_seq_len"] = 4096
    with pytest.raises(EngineMismatchError, match="max_seq_len 4096 > the export's 256"):
        check_against_export(engines, manifest, out)
    engines = load_engines_manifest(out)
    engines.export_manifest_sha256 = "f" * 64
    with pytest.raises(EngineMismatchError, match=r"manifest\.json changed"):
        check_against_export(engines, manifest, out)


def test_engines_must_match_tensorrt_and_gpu(tiny_export, tmp_path: Path) -> None:
    engines = load_engines_manifest(fake_build(tiny_export("llama"), tmp_path / "out"))
    check_against_device(engines, "10.3.0", DEVICE)
    with pytest.raises(
        EngineMismatchError, match=r"built with TensorRT 10\.3\.0, this is TensorRT"
    ):
        check_against_device(engines, "8.6.2", DEVICE)
    with pytest.raises(EngineMismatchError, match=r"compute capability 8\.7.*this GPU is 8\.9"):
        check_against_device(engines, "10.3.0", DeviceInfo("RTX 4090", "8.9"))
    other = DeviceInfo("Orin (nvgpu) AGX", "8.7")
    with pytest.raises(EngineMismatchError, match="same compute capability"):
        check_against_device(engines, "10.3.0", other)
    check_against_device(engines, "10.3.0", other, strict_name=False)


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is importable here: the error path cannot be hit")
def test_build_without_tensorrt_is_a_clear_error(tiny_export, tmp_path: Path) -> None:
    from trt.build import build_engines

    out = tmp_path / "out"
    shutil.copytree(tiny_export("llama"), out)
    with pytest.raises(TensorRTUnavailableError, match="TensorRT's Python package"):
        build_engines(out, progress=None)
    result = CliRunner().invoke(main, ["build", str(out), "--target", "orin-nano-8gb"])
    assert result.exit_code == 1 and "not importable" in result.output
    assert not (out / ENGINES_NAME).exists()
    # run and eval name the missing TensorRT as build does, not the engines.json build would write
    for args in (["run", str(out), "--prompt", "hi"], ["eval", str(out), "--task", "demo"]):
        result = CliRunner().invoke(main, [*args, "--engine", "tensorrt"])
        assert result.exit_code == 1 and "TensorRT's Python package is not importable" in (
            result.output
        ), result.output
        assert "engines.json" not in result.output


# ---------------------------------------------------------------------------------------------
# The step model's buffer protocol, with onnxruntime standing in for TensorRT
# ---------------------------------------------------------------------------------------------


def _prompt(tok, text: str) -> np.ndarray:
    return np.array([tok(text)["input_ids"]], dtype=np.int64)


@pytest.mark.parametrize("family", ["llama", "mpt"])
def test_step_model_matches_onnxruntime_greedy_and_beams(tiny_model, tiny_export, tmp_path, family):
    _, tok, _, _ = tiny_model(family)
    out = fake_build(tiny_export(family), tmp_path / "out", max_batch=3, max_seq_len=64)
    trt = stand_in_engine(out)
    ort = OnnxFlamingo(out)
    pixels = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    feats_t, feats_o = trt.encode_images(pixels), ort.encode_images(pixels)
    for name in feats_o:
        assert np.array_equal(feats_t[name], feats_o[name]), name
    ids = _prompt(tok, "<image>A red circle<|endofchunk|><image>A blue")
    mask = np.ones_like(ids)
    for beams in (1, 3):
        config = GenerationConfig(
            max_new_tokens=8,
            num_beams=beams,
            eos_token_ids=(trt.eoc_token_id,),
            pad_token_id=trt.pad_token_id,
        )
        ref = generate(ort.step_model(ort.rows_cross_kv(feats_o, [[0, 1]]), np.array([2])),
                       ids, mask, config)  # fmt: skip
        got = generate(trt.step_model(trt.rows_cross_kv(feats_t, [[0, 1]]), np.array([2])),
                       ids, mask, config)  # fmt: skip
        assert got.sequences == ref.sequences
        for a, b in zip(got.logprobs, ref.logprobs):
            assert np.abs(np.array(a) - np.array(b)).max(initial=0) <= 1e-5
    calls = trt.executors["decoder"].calls
    assert calls["prefill"] == 2 and calls["decode"] >= 8 and calls["extend"] == 0
    # the last call was a decode step: it bound each row's current image's keys only
    x_name = next(n for n in trt.decoder_spec.input_names if n.startswith("cross_attn."))
    assert trt.executors["decoder"].shapes[x_name][2] == trt.dims.num_latents


def test_step_model_chunks_a_long_continuation_over_profiles(tiny_model, tiny_export, tmp_path):
    """A cached past then many new tokens: extend chunks while the past allows, then decode
    steps; all-position logits equal onnxruntime's single call."""
    _, tok, _, _ = tiny_model("gpt_neox")
    out = fake_build(tiny_export("gpt_neox"), tmp_path / "out", max_seq_len=24)  # chunk 12
    trt, ort = stand_in_engine(out), OnnxFlamingo(out)
    pixels = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    kv = ort.rows_cross_kv(ort.encode_images(pixels), [[0]])
    rng = np.random.default_rng(3)
    ids = np.concatenate([_prompt(tok, "<image>"), rng.integers(5, 300, (1, 19))], axis=1)
    ref = ort.step_model(kv, np.array([1])).run(ids, np.ones_like(ids))
    model = trt.step_model(kv, np.array([1]))
    first = model.run(ids[:, :3], np.ones((1, 3), dtype=np.int64))  # prefill: 3 tokens
    rest = model.run(ids[:, 3:], np.ones((1, 20), dtype=np.int64))  # 17 tokens after 3
    assert np.abs(np.concatenate([first, rest], axis=1) - ref).max() < 1e-5
    # past 3: extend 12 (past 15 > 24-12: extend no longer fits), then 5 decode steps
    assert trt.executors["decoder"].calls == Counter(prefill=1, extend=1, decode=5)
    assert model.past_length == 20
    host = model.past_arrays()
    assert host["past_key_values.0.key"].shape[2] == 20
    with pytest.raises(ValueError, match="exceed the engines' max_seq_len 24"):
        model.step(rng.integers(5, 300, (1, 5)), np.ones((1, 25), dtype=np.int64))


def test_step_model_limits_are_clear_errors(tiny_model, tiny_export, tmp_path) -> None:
    _, tok, _, _ = tiny_model("llama")
    out = fake_build(tiny_export("llama"), tmp_path / "out", max_batch=1, max_images=2)
    trt = stand_in_engine(out)
    pixels = np.zeros((3, 3, 32, 32), dtype=np.float32)
    # more images than the engine's max_images run in parts (2 + 1), like one run of each
    whole = trt.encode_images(pixels)["image_latents"]
    part = trt.encode_images(pixels[2:])["image_latents"]
    assert whole.shape[0] == 3 and np.array_equal(whole[2:], part)
    with pytest.raises(ValueError, match=r"2 frames per media item: .*built for 1\.\.1"):
        trt.encode_images(pixels[:, None].repeat(2, axis=1))
    feats = trt.encode_images(pixels[:2])
    model = trt.step_model(trt.rows_cross_kv(feats, [[0, 1]]), np.array([2]))
    ids = _prompt(tok, "<image><image>hi")
    model.step(ids, np.ones_like(ids))
    with pytest.raises(
        ValueError, match=r"batch 3 exceeds the engines' max_batch 1.*--max-batch 3"
    ):
        model.reorder_cache(np.array([0, 0, 0]))
    trt.step_model(trt.rows_cross_kv(feats, [[0]]), np.array([1]))
    with pytest.raises(RuntimeError, match="newer step model"):
        model.step(ids[:, :1], np.ones((1, ids.shape[1] + 1), dtype=np.int64))


def test_trt_pipeline_with_prefix_cache_matches_onnxruntime(tiny_model, tiny_export, tmp_path):
    """The real pipeline (few-shot prefix cache: the query runs in the extend profile) over the
    stand-in engines gives onnxruntime's tokens and log-probs."""
    from PIL import Image

    out = fake_build(tiny_export("mpt"), tmp_path / "out", max_seq_len=256)
    images = []
    for i, color in enumerate(("red", "blue", "green")):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (40, 30), color).save(images[-1])
    prompt = "<image>Output:a red one<|endofchunk|><image>Output:a blue one<|endofchunk|>"
    prompt += "<image>Output:"
    ort = FlamingoPipeline(out)
    trt = FlamingoPipeline(out, engine=stand_in_engine(out))
    assert trt.max_seq_len == 256
    config = ort.default_config(max_new_tokens=6)
    for _ in range(2):  # the second call reuses the cached demonstrations
        a = ort.generate(prompt, [str(p) for p in images], config)
        b = trt.generate(prompt, [str(p) for p in images], config)
        assert a.token_ids == b.token_ids
        assert np.abs(np.array(a.logprobs) - np.array(b.logprobs)).max() <= 1e-5
    calls = trt.engine.executors["decoder"].calls
    assert calls["extend"] >= 1 and calls["prefill"] >= 1
    assert b.stats["cached_tokens"] > 0


# ---------------------------------------------------------------------------------------------
# With TensorRT and a GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not HAVE_TRT,
    reason="tensorrt is not importable here (no GPU/TensorRT in CI); run on a Jetson or a "
    "CUDA machine with `pip install '.[tensorrt]'` to build and run real engines",
)
def test_real_build_and_parity_with_onnxruntime(tiny_export, tmp_path: Path) -> None:
    from trt.build import build_engines

    out = tmp_path / "out"
    shutil.copytree(tiny_export("llama"), out)
    engines = build_engines(out, max_batch=3, max_seq_len=128, progress=print)
    assert (out / "vision.engine").is_file() and (out / "decoder.engine").is_file()
    assert load_engines_manifest(out).to_dict() == engines.to_dict()
    trt = TrtFlamingo(out)
    ort = OnnxFlamingo(out)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ft, fo = trt.encode_images(pixels), ort.encode_images(pixels)
    for name in fo:
        assert np.abs(ft[name] - fo[name]).max() < 1e-3, name
    ids = np.array([[trt.media_token_id, 5, 6, trt.media_token_id, 7, 8]], dtype=np.int64)
    mask = np.ones_like(ids)
    lt = trt.step_model(trt.rows_cross_kv(ft, [[0, 1]]), np.array([2])).step(ids, mask)
    lo = ort.step_model(ort.rows_cross_kv(fo, [[0, 1]]), np.array([2])).step(ids, mask)
    assert np.abs(lt - lo).max() < 1e-3  # fp32 engine, TF32 off


def test_tensorrt_import_error_names_the_install(monkeypatch) -> None:
    from trt.device import import_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailableError, match="JetPack"):
        import_tensorrt()
