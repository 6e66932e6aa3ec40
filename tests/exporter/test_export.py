"""Export: fp32 onnxruntime parity with the PyTorch reference per LM family, graph rules,
manifest checks, and the export command's error handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from cli.main import main
from flamingo.generate import TorchStepModel
from runtime.engine import OnnxFlamingo
from runtime.generation import GenerationConfig, generate
from runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, ManifestError, load_manifest
from runtime.spec import ModelDims, decoder_spec, vision_spec
from tests.conftest import FAMILIES
from tests.prompts_fixture import batch
from trt.rules import check_graph, dynamic_dims

TOL = 1e-4


def _rows(counts: list[int]) -> list[list[int]]:
    """Row b's images as indices into the flat image batch."""
    rows, start = [], 0
    for n in counts:
        rows.append(list(range(start, start + n)))
        start += n
    return rows


def _setup(tiny_model, tiny_export, family: str):
    model, tok, _, _ = tiny_model(family)
    engine = OnnxFlamingo(tiny_export(family))
    vision_x, ids, mask, counts = batch(tok, model.cfg.vision.image_size)
    pixels = torch.cat([vision_x[b, :n, 0] for b, n in enumerate(counts)])
    features = engine.encode_images(pixels.numpy())
    cross_kv = engine.rows_cross_kv(features, _rows(counts))
    num_images = np.array(counts)
    return (
        model,
        tok,
        engine,
        vision_x,
        ids.numpy(),
        mask.numpy(),
        pixels,
        features,
        cross_kv,
        num_images,
    )


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_vision_graph_parity(tiny_model, tiny_export, family: str) -> None:
    model, _, engine, _, _, _, pixels, features, _, _ = _setup(tiny_model, tiny_export, family)
    latents = model.encode_images(pixels)
    assert np.abs(features["image_latents"] - latents.numpy()).max() <= TOL
    for j, (k, v) in zip(engine.dims.xattn_layers, model.lang_model.media_kv(latents)):
        assert np.abs(features[f"cross_attn.{j}.key"] - k.numpy()).max() <= TOL
        assert np.abs(features[f"cross_attn.{j}.value"] - v.numpy()).max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_decoder_parity_prefill_and_20_decode_steps(tiny_model, tiny_export, family: str) -> None:
    model, _, engine, vision_x, ids, mask, _, _, cross_kv, num_images = _setup(
        tiny_model, tiny_export, family
    )
    ort_step = engine.step_model(cross_kv, num_images)
    ref_step = TorchStepModel(model, vision_x, num_images)
    ort_logits = ort_step.run(ids, mask)
    ref_logits = ref_step.step(ids, mask)  # last position
    real = mask.astype(bool)
    # all real positions of the prefill against the reference's own full forward
    full = model(vision_x, torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert np.abs(ort_logits[real] - full[real]).max() <= TOL
    assert np.abs(ort_logits[:, -1] - ref_logits).max() <= TOL
    for _ in range(20):  # teacher-forced on the reference's greedy tokens
        nxt = ref_logits.argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        ref_logits = ref_step.step(nxt, mask)
        ort = ort_step.step(nxt, mask)
        assert np.abs(ort - ref_logits).max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_logits_index_selects_positions_and_step_computes_only_the_last(
    tiny_model, tiny_export, family: str
) -> None:
    """logits_index picks rows of the reference's full-sequence logits; a generation step
    (prefill included) has the graph compute the last position's LM head only."""
    model, _, engine, vision_x, ids, mask, _, _, cross_kv, num_images = _setup(
        tiny_model, tiny_export, family
    )
    full = model(vision_x, torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    session = engine.sessions["decoder"]
    feeds = []

    class Recording:  # the step model's plain session.run path, feeds recorded
        def run(self, names, feed):
            feeds.append(feed)
            return session.run(names, feed)

    engine.sessions["decoder"] = Recording()
    try:
        step = engine.step_model(cross_kv, num_images, io_binding=False)
        last = step.step(ids, mask)
        pick = engine.step_model(cross_kv, num_images, io_binding=False)
        picked = pick._forward(ids, mask, all_positions=True)
    finally:
        engine.sessions["decoder"] = session
    assert feeds[0]["logits_index"].tolist() == [ids.shape[1] - 1]
    assert np.abs(last - full[:, -1]).max() <= TOL
    assert feeds[1]["logits_index"].tolist() == list(range(ids.shape[1]))
    real = mask.astype(bool)
    assert np.abs(picked[real] - full[real]).max() <= TOL
    some = np.array([1, ids.shape[1] - 1], dtype=np.int64)  # any positions, in any count
    feed = {**feeds[1], "logits_index": some}
    (logits,) = session.run(["logits"], feed)
    assert logits.shape == (ids.shape[0], 2, model.cfg.lm.vocab_size)
    assert np.abs(logits - full[:, some]).max() <= TOL


@pytest.mark.parametrize("num_beams", [1, 3])
def test_decode_steps_attend_to_the_current_image_only(
    tiny_model, tiny_export, num_beams: int
) -> None:
    """Decode steps get each row's current image's K/V (num_latents keys, index 1) instead of
    all its images' under a mask: same tokens, same scores, fewer keys read per step."""
    _, _, engine, _, ids, mask, _, _, cross_kv, num_images = _setup(
        tiny_model, tiny_export, "llama"
    )
    latents = engine.dims.num_latents
    assert next(iter(cross_kv.values())).shape[2] > latents  # the batch has multi-image rows
    session = engine.sessions["decoder"]
    keys_fed: list[int] = []

    class Recording:
        def run(self, names, feed):
            keys_fed.append(feed[next(n for n in feed if n.startswith("cross_attn."))].shape[2])
            return session.run(names, feed)

    config = GenerationConfig(max_new_tokens=6, num_beams=num_beams, eos_token_ids=())
    results = {}
    engine.sessions["decoder"] = Recording()
    try:
        for current_only in (True, False):
            keys_fed.clear()
            model = engine.step_model(cross_kv, num_images, io_binding=False)
            model.current_image_only = current_only
            results[current_only] = (generate(model, ids, mask, config), list(keys_fed))
    finally:
        engine.sessions["decoder"] = session
    (local, local_keys), (full, full_keys) = results[True], results[False]
    assert local.sequences == full.sequences
    assert np.abs(np.array(local.logprobs) - np.array(full.logprobs)).max() <= 1e-6
    if num_beams > 1:
        assert np.abs(np.array(local.scores) - np.array(full.scores)).max() <= 1e-6
    assert local_keys[0] == full_keys[0] > latents  # the prefill spans images: all keys
    assert set(local_keys[1:]) == {latents} and set(full_keys[1:]) == {full_keys[0]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_beams", [1, 3])
@torch.no_grad()
def test_generations_identical(tiny_model, tiny_export, family: str, num_beams: int) -> None:
    model, _, engine, vision_x, ids, mask, _, _, cross_kv, num_images = _setup(
        tiny_model, tiny_export, family
    )
    config = GenerationConfig(
        max_new_tokens=20,
        num_beams=num_beams,
        eos_token_ids=(model.cfg.eoc_token_id,),
        pad_token_id=model.cfg.pad_token_id,
    )
    ours = generate(engine.step_model(cross_kv, num_images), ids, mask, config)
    ref = generate(TorchStepModel(model, vision_x, num_images), ids, mask, config)
    assert ours.sequences == ref.sequences
    for a, b in zip(ours.logprobs, ref.logprobs):
        assert np.abs(np.array(a) - np.array(b)).max(initial=0) <= TOL
    if num_beams > 1:
        assert np.abs(np.array(ours.scores) - np.array(ref.scores)).max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_rules_and_dynamic_axes(tiny_export, family: str) -> None:
    out = tiny_export(family)
    manifest = load_manifest(out)
    dims = ModelDims.from_config(manifest.model)
    for name, spec in (("vision", vision_spec(dims)), ("decoder", decoder_spec(dims))):
        path = out / manifest.graphs[name].file
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        assert model.opset_import[0].version == 17
        assert check_graph(model) == [], check_graph(model)
        ops = {n.op_type for n in model.graph.node}
        if name == "decoder":
            assert {"MatMul", "Softmax", "Concat"} <= ops  # attention written out, KV concat
        # every dynamic axis of the spec is symbolic in the graph, with the spec's name
        declared = dynamic_dims(model)
        assert [t.name for t in model.graph.input] == spec.input_names
        assert [t.name for t in model.graph.output] == spec.output_names
        for t in (*spec.inputs, *spec.outputs):
            for axis, dim_name in t.dynamic_axes().items():
                assert declared[t.name][axis] == dim_name, (t.name, axis)
        assert manifest.graphs[name].spec == spec


@pytest.mark.parametrize("family", FAMILIES)
def test_graphs_are_lean(tiny_export, family: str) -> None:
    """No shape arithmetic inside the repeated blocks: every head split/merge is one Reshape with
    a constant shape, rotary slices are constant, attention scales are constants, and no zero
    bias is added to score tensors. At batch 1 a decode step costs weight reads plus a few us
    per node, so the per-layer node count is decode time (the 144M bench model went 922 -> 606
    executed nodes per step, vision 635 -> 377)."""
    out = tiny_export(family)
    blocks = ("/layers.", "/cross_attn_layers.", "/resblocks.", "/perceiver/layers.")
    for name in ("vision", "decoder"):
        model = onnx.load(str(out / f"{name}.onnx"), load_external_data=False)
        in_blocks = [n for n in model.graph.node if any(b in n.name for b in blocks)]
        assert in_blocks
        shape_math = [n.name for n in in_blocks if n.op_type in ("Shape", "Gather", "Neg")]
        assert shape_math == [], shape_math[:5]
        for node in in_blocks:
            if node.op_type == "Reshape":  # its target shape is a Constant node's output
                producers = [p for p in model.graph.node if node.input[1] in p.output]
                assert [p.op_type for p in producers] == ["Constant"], node.name
        if name == "vision":  # no attention mask, so no Add on any score tensor
            producer = {o: n for n in model.graph.node for o in n.output}
            for softmax in (n for n in in_blocks if n.op_type == "Softmax"):
                src = producer[softmax.input[0]]
                while src.op_type == "Cast":
                    src = producer[src.input[0]]
                assert src.op_type != "Add", softmax.name


def test_manifest_contents_and_tamper_detection(tiny_export, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny_export("llama"), out)
    manifest = load_manifest(out)
    assert manifest.special_tokens["media_token"] == "<image>"
    assert manifest.preprocess["image_size"] == manifest.model["vision"]["image_size"]
    assert "tokenizer/tokenizer.json" in manifest.files
    assert set(manifest.tools) >= {"torch", "onnx", "onnxruntime", "transformers"}
    with open(out / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match=r"decoder\.onnx.*sha256"):
        load_manifest(out)
    data = json.loads((out / MANIFEST_NAME).read_text())
    data["schema_version"] = 99
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="schema_version 99"):
        load_manifest(out)
    data["schema_version"] = SCHEMA_VERSION
    data["files"]["../escape.txt"] = "0" * 64
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="escapes the export folder"):
        load_manifest(out)


def _cli_args(paths, out: Path, *extra: str) -> list[str]:
    return [
        "export",
        "--lm", str(paths.lm_dir),
        "--vision", str(paths.vision_path),
        "--checkpoint", str(paths.checkpoint_path),
        "--output", str(out),
        *extra,
    ]  # fmt: skip


def test_cli_export_refuses_existing_output_and_force_replaces(tiny_paths, tmp_path) -> None:
    paths = tiny_paths("mpt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me unless --force")
    runner = CliRunner()
    result = runner.invoke(main, _cli_args(paths, out))
    assert result.exit_code != 0 and "already exists; pass --force" in result.output
    assert (out / "old.txt").exists()
    result = runner.invoke(main, [*_cli_args(paths, out, "--force", "--json")])
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists()
    assert (out / MANIFEST_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or backup folders left


def test_cli_export_bad_options_and_unwritable_output(tiny_paths, tmp_path) -> None:
    paths = tiny_paths("mpt")
    runner = CliRunner()
    result = runner.invoke(main, _cli_args(paths, tmp_path / "o", "--opset", "21"))
    assert result.exit_code != 0 and "--opset 21 is not supported" in result.output
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = runner.invoke(main, _cli_args(paths, blocker / "sub" / "out"))
    assert result.exit_code != 0 and "cannot create" in result.output
    assert "Traceback" not in result.output


def test_interrupted_export_leaves_nothing(tiny_model, tmp_path, monkeypatch) -> None:
    import exporter.export as ex

    model, tok, _, _ = tiny_model("llama")
    real = ex.export_graph
    calls = []

    def interrupt_on_decoder(module, args, spec, path, opset):
        calls.append(spec.name)
        if spec.name == "decoder":
            raise KeyboardInterrupt
        return real(module, args, spec, path, opset)

    monkeypatch.setattr(ex, "export_graph", interrupt_on_decoder)
    with pytest.raises(KeyboardInterrupt):
        ex.export_model(model, tok, tmp_path / "out", progress=None)
    assert calls == ["vision", "decoder"]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ limits (the LM's context)


def test_max_seq_len_defaults_to_the_lms_context(tiny_export) -> None:
    """The tiny LMs were trained on 256 positions (max_position_embeddings; MPT's max_seq_len):
    that, not 2048, is what the export declares."""
    for family in FAMILIES:
        manifest = load_manifest(tiny_export(family), verify_hashes=False)
        assert manifest.model["lm"]["max_position_embeddings"] == 256
        # max_frames 1: no frame embeddings, images only (docs/video.md)
        assert manifest.limits == {"max_images": 32, "max_seq_len": 256, "max_frames": 1}


def test_max_seq_len_beyond_a_rotary_lms_context_is_refused(tiny_model, tmp_path) -> None:
    from exporter.export import ExportError, ExportOptions, export_model

    for family in ("llama", "gpt_neox"):
        model, tok, _, _ = tiny_model(family)
        with pytest.raises(ExportError, match=rf"--max-seq-len 257 exceeds .* {family} LM was "
                           r"trained on 256 positions .* use at most 256"):  # fmt: skip
            export_model(model, tok, tmp_path / "out", ExportOptions(max_seq_len=257), None)
        assert not list(tmp_path.iterdir())  # refused before anything is written
    model, tok, _, _ = tiny_model("llama")
    with pytest.raises(ExportError, match="--max-images 100 exceeds max_seq_len 64"):
        export_model(
            model, tok, tmp_path / "o", ExportOptions(max_images=100, max_seq_len=64), None
        )
    for bad, message in (
        (ExportOptions(max_seq_len=10**12), r"--max-seq-len must be in \[2, 1048576\]"),
        (ExportOptions(max_seq_len=1), r"--max-seq-len must be in \[2, 1048576\]"),
        (ExportOptions(max_seq_len="512"), "--max-seq-len must be an int"),  # type: ignore[arg-type]
    ):
        with pytest.raises(ExportError, match=message):
            bad.validate()


def test_an_alibi_lm_may_extrapolate_with_a_warning(tiny_model, tmp_path) -> None:
    """MPT's ALiBi biases have no position table: past the trained length is allowed, said,
    and the runtime holds prompts to the export's limit, not to the trained length."""
    from exporter.export import ExportOptions, export_model
    from runtime.pipeline import FlamingoPipeline

    model, tok, _, _ = tiny_model("mpt")
    said: list[str] = []
    export_model(model, tok, tmp_path / "out", ExportOptions(max_seq_len=512), said.append)
    assert any(
        "warning: --max-seq-len 512 is beyond the 256 positions this mpt LM" in m for m in said
    )
    assert load_manifest(tmp_path / "out").limits["max_seq_len"] == 512
    pipe = FlamingoPipeline(tmp_path / "out")
    assert pipe.max_seq_len == 512
    out = pipe.generate(" red" * 300, [], GenerationConfig(max_new_tokens=2))
    assert out.stats["prompt_tokens"] > 256


def test_cli_export_refuses_an_absurd_max_seq_len_before_loading(tmp_path) -> None:
    missing = tmp_path / "nothing-here"
    result = CliRunner().invoke(
        main,
        ["export", "--lm", str(missing), "--vision", str(missing), "--checkpoint", str(missing),
         "-o", str(tmp_path / "out"), "--max-seq-len", str(10**12)],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "--max-seq-len must be in [2, 1048576], got 1000000000000" in result.output
    assert "nothing-here" not in result.output and "Traceback" not in result.output
