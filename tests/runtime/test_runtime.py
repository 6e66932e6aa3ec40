"""The torch-free pipeline: same tokens and text as the PyTorch reference, clear input errors,
and importable where torch and transformers cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from flamingo.generate import generate as reference_generate
from runtime.generation import GenerationConfig
from runtime.images import PreprocessConfig, preprocess
from runtime.pipeline import FlamingoPipeline, TextStream
from tests.conftest import FAMILIES


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, size in enumerate([(40, 50), (64, 30)]):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_pipeline_equals_reference(tiny_model, tiny_export, images, family: str) -> None:
    model, tok, _, _ = tiny_model(family)
    pipe = FlamingoPipeline(tiny_export(family))
    prompt = "<image>A red circle<|endofchunk|><image>A blue"
    assert pipe.tokenizer.encode(prompt).ids == tok(prompt)["input_ids"]
    out = pipe.generate(prompt, images)
    pixels = preprocess(images, PreprocessConfig(image_size=model.cfg.vision.image_size))
    vision_x = torch.from_numpy(pixels)[None, :, None]
    ref = reference_generate(model, vision_x, tok(prompt, return_tensors="pt")["input_ids"])
    assert out.token_ids == ref.sequences[0]
    assert np.allclose(out.logprobs, ref.logprobs[0], atol=1e-4)
    eoc = model.cfg.eoc_token_id
    assert out.text == tok.decode(
        [t for t in ref.sequences[0] if t != eoc], skip_special_tokens=True
    )


def test_pipeline_input_errors_keep_it_usable(tiny_export, images, tmp_path) -> None:
    """One pipeline, warm caches, a series of bad calls (each a clear error), then good calls
    that still hit the caches and give the same result as before."""
    pipe = FlamingoPipeline(tiny_export("llama"))
    config = GenerationConfig(max_new_tokens=3, eos_token_ids=(pipe.engine.eoc_token_id,))
    few = "<image>A red circle<|endofchunk|><image>A"
    before = pipe.generate(few, images, config)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    zero = np.zeros((0, 5, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="2 <image> markers but 1 image was given"):
        pipe.generate("<image>a<image>b", images[:1])
    with pytest.raises(ValueError, match="empty"):
        pipe.generate("  ", [])
    with pytest.raises(ValueError, match=r"bad\.png"):
        pipe.generate("<image>a", [str(bad)])
    with pytest.raises(ValueError, match=r"empty\.png"):
        pipe.generate(few, [images[0], str(empty)])  # the demo part is fine, the query is not
    with pytest.raises(ValueError, match="zero-size"):
        pipe.generate("<image>a", [zero])
    with pytest.raises(ValueError, match="maximum context"):
        pipe.generate("<image>a", images[:1], GenerationConfig(max_new_tokens=10_000))
    with pytest.raises(ValueError, match="maximum context"):
        pipe.generate("word " * 3000, [])
    with pytest.raises(ValueError, match="exceed this export's limit"):
        pipe.generate("<image>" * 40, images[:1] * 40)
    with pytest.raises(ValueError, match=r"prompt #1: .*1 <image> marker but 0 images"):
        pipe.generate_batch(["<image>a", "<image>b"], [images[:1], []])
    with pytest.raises(ValueError, match="2 prompts but 1 image list"):
        pipe.generate_batch(["a", "b"], [[]])
    with pytest.raises(ValueError, match="num_beams"):
        pipe.generate("<image>a", images[:1], GenerationConfig(num_beams=0))
    assert pipe.generate("<image>a", images[:1], GenerationConfig(max_new_tokens=3)).token_ids
    after = pipe.generate(few, images, config)
    assert after.stats["cached_tokens"] > 0
    assert (after.token_ids, after.logprobs) == (before.token_ids, before.logprobs)
    assert pipe.cache_stats()["prefix"]["entries"] == 1


def test_text_stream_prints_whole_characters(tiny_export) -> None:
    pipe = FlamingoPipeline(tiny_export("llama"))
    text = "héllo € 日本 ok"
    ids = pipe.tokenizer.encode(text).ids
    stream = TextStream(pipe.tokenizer, skip_ids=(pipe.engine.eoc_token_id,))
    pieces = [stream.push(t) for t in [*ids, pipe.engine.eoc_token_id]]
    assert "".join(pieces) + stream.flush() == text
    assert not any("\ufffd" in p for p in pieces)
    assert len([p for p in pieces if p]) < len(ids)  # multi-byte characters were held back


def test_run_command_streams_and_maps_flags(tiny_export, images, tmp_path) -> None:
    from click.testing import CliRunner

    from cli.main import main

    export = str(tiny_export("llama"))
    base = ["run", export, "--prompt", "<image>A", "--image", images[0], "--max-new-tokens", "6"]
    runner = CliRunner()
    plain = runner.invoke(main, [*base, "--json"])
    assert plain.exit_code == 0, plain.output
    result = json.loads(plain.output)
    streamed = runner.invoke(main, [*base, "--stream", "--provider", "cpu"])
    assert streamed.exit_code == 0, streamed.output
    assert streamed.output == result["text"] + "\n"
    sampled = [
        json.loads(runner.invoke(main, [*base, *flags, "--json"]).output)["token_ids"]
        for flags in (
            ["--do-sample", "--seed", "1", "--top-k", "5", "--temperature", "0.7"],
            ["--do-sample", "--seed", "1", "--top-k", "5", "--temperature", "0.7"],
            ["--num-beams", "2", "--length-penalty", "0.5", "--no-repeat-ngram-size", "2"],
        )
    ]
    assert sampled[0] == sampled[1]
    for args, message in (
        (["--provider", "nope"], "not available"),
        (["--top-p", "2", "--do-sample"], "--top-p"),
        (["--demos", str(tmp_path / "missing.jsonl")], "--prompt cannot be combined"),
    ):
        out = runner.invoke(main, [*base, *args])
        assert out.exit_code != 0 and message in out.output, out.output
    out = runner.invoke(main, ["run", export, "--demos", str(tmp_path / "missing.jsonl"),
                               "--image", images[0]])  # fmt: skip
    assert out.exit_code != 0 and "cannot read demonstrations" in out.output


def test_runtime_imports_and_runs_without_torch(tiny_export, images) -> None:
    """Every runtime module imports with torch, transformers, tensorrt, cuda-python and onnx
    blocked (runtime/engines.py reads engines.json without TensorRT, the manifest check reads
    external-data locations without onnx); the pipeline runs."""
    code = f"""
import importlib, pkgutil, sys
for blocked in ("torch", "transformers", "tensorrt", "cuda", "onnx"):
    sys.modules[blocked] = None
import runtime
for module in pkgutil.iter_modules(runtime.__path__):
    importlib.import_module("runtime." + module.name)
from runtime.pipeline import FlamingoPipeline, TextStream
from runtime.generation import GenerationConfig
out = FlamingoPipeline({str(tiny_export("mpt"))!r}).generate(
    "<image>A", [{images[0]!r}], GenerationConfig(max_new_tokens=4))
assert len(out.token_ids) >= 1
loaded = [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
assert "torch" not in loaded and "onnx" not in loaded
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_run_command_few_shot_without_torch(tiny_export, images, tmp_path) -> None:
    """`flamingo-export run --demos` with torch and transformers blocked; caption and VQA."""
    demos = tmp_path / "demos.jsonl"
    lines = [{"image": images[0], "caption": "red", "question": "colour?", "answer": "red"}] * 2
    demos.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    export = str(tiny_export("mpt"))
    code = f"""
import json, sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
from click.testing import CliRunner
from cli.main import main
base = ["run", {export!r}, "--demos", {str(demos)!r}, "--image", {images[1]!r}, "--json",
        "--max-new-tokens", "4"]
for extra in ([], ["--task", "vqa", "--question", "which?"]):
    result = CliRunner().invoke(main, base + extra, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert {{"text", "token_ids", "logprobs", "timings_ms", "stats"}} <= set(out), out
    assert len(out["token_ids"]) == len(out["logprobs"]) >= 1
    assert out["stats"]["images"] == 3
    assert out["query_image"] == {images[1]!r}
    assert [d["image"] for d in out["demonstrations"]] == [{images[0]!r}] * 2
    assert out["demonstrations"][0]["text"] == "red"
# text mode: the answer alone on stdout, what it was conditioned on on stderr
result = CliRunner().invoke(main, [a for a in base if a != "--json"])
assert result.exit_code == 0 and result.stdout.strip() and "->" not in result.stdout
assert "2 demonstration(s):" in result.stderr and "red" in result.stderr
assert "query: " + {images[1]!r} in result.stderr
mods = [m for m in sys.modules if sys.modules[m] is not None]
assert not [m for m in mods if m.split(".")[0] in ("torch", "transformers")]
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_vision_workers_do_not_spin_into_the_decoder(tiny_export) -> None:
    """The vision pool's idle workers would spin while the decoder prefill runs right after
    it (runtime.engine.NO_SPIN_GRAPHS); the decoder keeps ORT's default spinning."""

    def spinning(session) -> str:
        try:
            return session.get_session_options().get_session_config_entry(
                "session.intra_op.allow_spinning"
            )
        except RuntimeError:  # not set: onnxruntime's default (spin)
            return "default"

    pipe = FlamingoPipeline(tiny_export("llama"), threads=2)
    assert spinning(pipe.engine.sessions["vision"]) == "0"
    assert spinning(pipe.engine.sessions["decoder"]) == "default"
    from runtime.engine import OnnxFlamingo

    quiet = OnnxFlamingo(tiny_export("llama"), threads=2, spin=False)  # a shared machine's choice
    assert spinning(quiet.sessions["vision"]) == spinning(quiet.sessions["decoder"]) == "0"
    shared = FlamingoPipeline(tiny_export("llama"), threads=2, allow_spinning=False)
    assert spinning(shared.engine.sessions["decoder"]) == "0"


def test_beams_share_their_prompts_image_kv(tiny_export, images) -> None:
    """Beam search expands every row to its beams (reorder_cache); the image K/V stay one copy
    per prompt (the rows are gathered only if a later step needs all images' keys), and each
    beam's logits are those of a model given physically repeated K/V."""
    from runtime.decoding import rows_cross_kv
    from runtime.engine import OnnxFlamingo

    engine = OnnxFlamingo(tiny_export("llama"))
    pixels = preprocess(images, PreprocessConfig(engine.manifest.preprocess["image_size"]))
    features = engine.encode_images(pixels)
    rows = [[0, 1], [1]]  # two prompts: two images, one image
    cross = rows_cross_kv(features, rows, engine.dims, engine.float_dtype)
    media = engine.media_token_id
    ids = np.array([[media, 5, 6, media, 7], [9, 9, media, 5, 6]], dtype=np.int64)
    mask = np.ones_like(ids)
    beams = np.repeat(np.arange(2), 3)
    shared = engine.step_model(cross, np.array([2, 1]))
    shared.step(ids, mask)
    shared.reorder_cache(beams)
    copied = engine.step_model(
        {k: v[beams] for k, v in cross.items()}, np.array([2, 2, 2, 1, 1, 1])
    )
    copied.step(ids[beams], mask[beams])
    step_ids = np.full((6, 1), 11, dtype=np.int64)
    step_mask = np.ones((6, 6), dtype=np.int64)
    np.testing.assert_allclose(
        shared.step(step_ids, step_mask), copied.step(step_ids, step_mask), atol=1e-5
    )
    assert all(v.shape[0] == 2 for v in shared.cross_kv.values())  # not one copy per beam
    shared.reorder_cache(np.array([0, 0, 2, 3, 3, 5]))  # beams move: the map follows
    copied.reorder_cache(np.array([0, 0, 2, 3, 3, 5]))
    step_mask = np.ones((6, 7), dtype=np.int64)
    np.testing.assert_allclose(
        shared.step(step_ids, step_mask), copied.step(step_ids, step_mask), atol=1e-5
    )
    assert all(v.shape[0] == 2 for v in shared.cross_kv.values())
