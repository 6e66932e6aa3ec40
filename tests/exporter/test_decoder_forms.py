"""Decoder forms (runtime.spec.DecoderForm, exporter/decoder_forms.py): each derived form yields
the portable graph's tokens per LM family; the in-graph media index is the documented rule;
the manifest records the form and refuses contradictions."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from cli.main import main
from exporter.decoder_forms import derive_export
from runtime.decoding import in_graph_media_index
from runtime.engine import OnnxFlamingo, OrtInplaceStepModel
from runtime.generation import GenerationConfig, generate
from runtime.manifest import MANIFEST_NAME, ManifestError, load_manifest
from runtime.spec import PORTABLE, DecoderForm, DecoderFormError
from tests.conftest import FAMILIES
from tests.prompts_fixture import PROMPTS, batch

IN_GRAPH = DecoderForm(indices="in-graph")
INPLACE = DecoderForm(kv_cache="inplace")
BOTH = DecoderForm(kv_cache="inplace", indices="in-graph")
TOL = 1e-5


@pytest.fixture(scope="module")
def form_export(tiny_export, tmp_path_factory) -> Callable[[str, DecoderForm], Path]:
    """form_export(family, form) -> the tiny export derived into `form` (cached)."""
    cache: dict[tuple[str, DecoderForm], Path] = {}

    def make(family: str, form: DecoderForm) -> Path:
        if form.portable:
            return tiny_export(family)
        if (family, form) not in cache:
            out = tmp_path_factory.mktemp(f"form-{family}") / "out"
            derive_export(tiny_export(family), out, form)
            cache[family, form] = out
        return cache[family, form]

    return make


def _row_inputs(engine: OnnxFlamingo, tok, prompt: str, seed: int = 0):
    """(input_ids, mask, cross K/V, image count) of one prompt with random images."""
    vision_x, ids, mask, counts = batch(tok, engine.dims.image_size, (prompt,), seed)
    n = counts[0]
    rows = [list(range(n))]
    if n:
        features = engine.encode_images(vision_x[0, :n, 0].numpy())
    else:
        features = {k: [] for k in engine.vision_spec.output_names}
    return ids.numpy(), mask.numpy(), engine.rows_cross_kv(features, rows), np.array([n])


def _generate(export: Path, tok, prompt: str, config: GenerationConfig, io_binding: bool = True):
    engine = OnnxFlamingo(export)
    ids, mask, cross, n = _row_inputs(engine, tok, prompt)
    return generate(engine.step_model(cross, n, io_binding=io_binding), ids, mask, config)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("form", [IN_GRAPH, INPLACE, BOTH], ids=["in-graph", "inplace", "both"])
def test_form_generates_the_portable_tokens(tiny_model, form_export, family, form) -> None:
    """Greedy over each one-row prompt (text before the first image included): same tokens,
    logprobs equal to float rounding; with and without IOBinding."""
    _, tok, _, _ = tiny_model(family)
    config = GenerationConfig(max_new_tokens=24, eos_token_ids=())
    for prompt in PROMPTS:
        ref = _generate(form_export(family, PORTABLE), tok, prompt, config)
        for io_binding in (True, False):
            got = _generate(form_export(family, form), tok, prompt, config, io_binding)
            assert got.sequences == ref.sequences, (prompt, io_binding)
            diff = np.abs(np.array(got.logprobs) - np.array(ref.logprobs)).max()
            assert diff <= TOL, (prompt, io_binding, diff)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_inplace_batch_with_left_padding_and_beams(tiny_model, form_export, family, num_beams):
    """The left-padded batch of rows with different image counts (pads live in the bias),
    beams reordering the in-place buffers: the portable tokens and scores."""
    _, tok, _, _ = tiny_model(family)
    results = []
    for form in (PORTABLE, INPLACE):
        engine = OnnxFlamingo(form_export(family, form))
        vision_x, ids, mask, counts = batch(tok, engine.dims.image_size)
        features = engine.encode_images(
            np.concatenate([vision_x[b, :n, 0].numpy() for b, n in enumerate(counts)])
        )
        rows, start = [], 0
        for n in counts:
            rows.append(list(range(start, start + n)))
            start += n
        model = engine.step_model(engine.rows_cross_kv(features, rows), np.array(counts))
        config = GenerationConfig(max_new_tokens=16, num_beams=num_beams, eos_token_ids=())
        results.append(generate(model, ids.numpy(), mask.numpy(), config))
        if form == INPLACE:
            assert isinstance(model, OrtInplaceStepModel)
    ref, got = results
    assert got.sequences == ref.sequences
    for a, b in zip(got.logprobs, ref.logprobs):
        assert np.abs(np.array(a) - np.array(b)).max(initial=0) <= TOL
    if num_beams > 1:
        assert np.abs(np.array(got.scores) - np.array(ref.scores)).max() <= TOL


def test_inplace_cache_grows_and_is_written_in_place(tiny_model, form_export) -> None:
    """Past the first capacity the buffers double (cache kept); between growths each step's
    present is the very buffer bound as past (no copy); logits and cache match the portable's."""
    _, tok, _, _ = tiny_model("llama")
    engine = OnnxFlamingo(form_export("llama", INPLACE))
    ids, mask, cross, n = _row_inputs(engine, tok, PROMPTS[0])
    model = engine.step_model(cross, n)
    model.GROWTH = 8
    model._set_buffers({k: v[:, :, :0] for k, v in model._buffers.items()})
    model._grow(1)  # start small: 8 positions
    ref = OnnxFlamingo(form_export("llama", PORTABLE)).step_model(cross, n)
    capacities, in_place = [], 0
    for _ in range(30):
        before = next(iter(model._buffers.values())).ctypes.data, model.capacity
        got, want = model.step(ids, mask), ref.step(ids, mask)
        assert np.abs(got - want).max() <= TOL
        assert model.past_length == ref.past_length
        for name, value in ref.past.items():
            assert np.abs(model.past[name] - value).max() <= TOL
        if model.capacity == before[1]:
            assert next(iter(model._buffers.values())).ctypes.data == before[0]
            in_place += 1
        capacities.append(model.capacity)
        ids = want.argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
    assert capacities == sorted(capacities) and capacities[0] < capacities[-1], capacities
    assert in_place >= len(capacities) - len(set(capacities)), capacities


def test_in_graph_media_index_is_the_documented_rule(tiny_model, form_export) -> None:
    """The graph's own media_index (exposed as an output of a copy) equals
    runtime.decoding.in_graph_media_index on prefills, decode steps and prefix+rest chunks."""
    model = onnx.load(str(form_export("llama", IN_GRAPH) / "decoder.onnx"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("media_index", 7, None))
    session = ort.InferenceSession(model.SerializeToString())
    engine = OnnxFlamingo(form_export("llama", IN_GRAPH))
    media = engine.media_token_id
    dims = engine.dims
    rng = np.random.default_rng(0)
    for past, new, images in ((0, 9, 3), (0, 9, 1), (6, 1, 2), (5, 7, 3), (4, 3, 1), (0, 4, 2)):
        ids = rng.integers(0, dims.vocab_size - 3, (2, new))
        ids[rng.random((2, new)) < 0.3] = media
        ids[:, -1] = media
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((2, past + new), np.int64),
            "position_ids": np.broadcast_to(np.arange(past, past + new), (2, new)).copy(),
        }
        for arg in session.get_inputs():
            if arg.name.startswith(("cross_attn.", "past_key_values.")):
                length = images * dims.num_latents if arg.name.startswith("cross") else past
                shape = [2, arg.shape[1], length, arg.shape[3]]
                feed[arg.name] = rng.standard_normal(shape).astype(np.float32)
        got = session.run(["media_index"], feed)[0]
        assert np.array_equal(got, in_graph_media_index(ids, past, images, media)), (past, new)


def _batch_model(engine: OnnxFlamingo, tok, prompts):
    vision_x, ids, mask, counts = batch(tok, engine.dims.image_size, prompts)
    pixels = [vision_x[b, :n, 0].numpy() for b, n in enumerate(counts) if n]
    features = engine.encode_images(np.concatenate(pixels))
    rows, start = [], 0
    for n in counts:
        rows.append(list(range(start, start + n)))
        start += n
    model = engine.step_model(engine.rows_cross_kv(features, rows), np.array(counts))
    return model, ids.numpy(), mask.numpy()


def test_in_graph_batches_and_refusals(tiny_model, form_export) -> None:
    """Rows with different image counts decode with the portable tokens (each decode step is
    fed every row's current image alone, so the rule's "last image" is each row's own); a
    text-only row beside image rows is a DecoderFormError naming the portable form, never
    other tokens; all-position logits (scoring) are the portable graph's."""
    _, tok, _, _ = tiny_model("llama")
    config = GenerationConfig(max_new_tokens=12, eos_token_ids=())
    got, want = (
        generate(*_batch_model(OnnxFlamingo(form_export("llama", form)), tok, PROMPTS), config)
        for form in (IN_GRAPH, PORTABLE)
    )
    assert got.sequences == want.sequences
    engine = OnnxFlamingo(form_export("llama", IN_GRAPH))
    mixed = (PROMPTS[0], "A red circle")
    with pytest.raises(DecoderFormError, match="portable"):
        generate(*_batch_model(engine, tok, mixed), config)
    ids, mask, cross, n = _row_inputs(engine, tok, PROMPTS[0])
    portable = OnnxFlamingo(form_export("llama", PORTABLE))
    got = engine.step_model(cross, n).run(ids, mask)
    want = portable.step_model(cross, n).run(ids, mask)
    assert got.shape == want.shape == (1, ids.shape[1], engine.dims.vocab_size)
    assert np.abs(got - want).max() <= TOL


def test_text_only_prompt_runs_in_graph(tiny_model, form_export) -> None:
    """A prompt without images: the in-graph form is fed K/V of no keys (index 0 throughout)
    and gives the portable tokens."""
    _, tok, _, _ = tiny_model("llama")
    config = GenerationConfig(max_new_tokens=8, eos_token_ids=())
    ref = _generate(form_export("llama", PORTABLE), tok, "A red circle", config)
    got = _generate(form_export("llama", IN_GRAPH), tok, "A red circle", config)
    assert got.sequences == ref.sequences


def test_manifest_records_the_form(form_export, tmp_path) -> None:
    """The form and its backends are written, read back, and a contradiction is refused;
    a derived export cannot be derived again."""
    out = form_export("llama", BOTH)
    manifest = load_manifest(out)
    assert manifest.graphs["decoder"].form == BOTH
    assert manifest.graphs["vision"].form == PORTABLE
    names = manifest.graphs["decoder"].spec.input_names
    assert "media_index" not in names and "logits_index" not in names
    d = json.loads((out / MANIFEST_NAME).read_text())
    assert d["graphs"]["decoder"]["backends"] == ["onnxruntime"]
    assert (
        "form"
        not in json.loads((form_export("llama", PORTABLE) / MANIFEST_NAME).read_text())["graphs"][
            "decoder"
        ]
    )
    d["graphs"]["decoder"]["backends"] = ["onnxruntime", "tensorrt"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in out.iterdir():
        if f.is_file():
            (bad / f.name).symlink_to(f)
    (bad / "tokenizer").symlink_to(out / "tokenizer")
    (bad / MANIFEST_NAME).unlink()
    (bad / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="backends"):
        load_manifest(bad, verify_hashes=False)
    with pytest.raises(DecoderFormError, match="portable export"):
        derive_export(out, tmp_path / "again", INPLACE)


def test_decoder_form_option_parse_and_cli_refusal(tmp_path) -> None:
    assert DecoderForm.parse("inplace,in-graph") == BOTH
    assert DecoderForm.parse("portable") == PORTABLE
    with pytest.raises(DecoderFormError, match="unknown decoder form 'fast'"):
        DecoderForm.parse("fast")
    assert DecoderForm.parse("concat,inputs") == PORTABLE
    assert DecoderForm.parse("inplace,inplace") == INPLACE
    for contradiction, words in (
        ("inplace,concat", "two kv_cache choices: 'inplace' and 'concat'"),
        ("in-graph,inputs", "two indices choices"),
        ("portable,inplace", "'portable' cannot be combined with 'inplace'"),
    ):
        with pytest.raises(DecoderFormError, match=words):
            DecoderForm.parse(contradiction)
    result = CliRunner().invoke(
        main,
        ["export", "--lm", str(tmp_path), "--vision", str(tmp_path / "v"),
         "--checkpoint", str(tmp_path / "c"), "--output", str(tmp_path / "o"),
         "--decoder-form", "fast"],
    )  # fmt: skip
    assert result.exit_code != 0 and "unknown decoder form 'fast'" in result.output


def test_export_writes_the_form_directly(tiny_model, form_export, tmp_path) -> None:
    """`export --decoder-form` (ExportOptions.decoder_form) rewrites at export: the same
    graph I/O and tokens as the derived export."""
    from exporter.export import ExportOptions, export_model

    model, tok, _, _ = tiny_model("llama")
    out = tmp_path / "both"
    export_model(model, tok, out, ExportOptions(decoder_form=BOTH), progress=None)
    manifest = load_manifest(out)
    derived = load_manifest(form_export("llama", BOTH))
    assert manifest.graphs["decoder"].form == BOTH
    assert manifest.graphs["decoder"].spec == derived.graphs["decoder"].spec
    config = GenerationConfig(max_new_tokens=8, eos_token_ids=())
    ref = _generate(form_export("llama", PORTABLE), tok, PROMPTS[2], config)
    assert _generate(out, tok, PROMPTS[2], config).sequences == ref.sequences


@pytest.mark.parametrize(
    "options",
    [
        {"decoder": "int8", "int8_mode": "weight-only"},
        {"decoder": "int8", "int8_mode": "dynamic"},
        {"decoder": "int4", "int4_format": "matmulnbits", "block_size": 32},
    ],
    ids=["int8-weight-only", "int8-dynamic", "int4-matmulnbits"],
)
def test_quantized_forms_generate_the_quantized_portable_tokens(
    tiny_model, form_export, tmp_path, options
) -> None:
    """Quantizing a derived form keeps it (manifest, onnxruntime-only backends) and computes
    what the portable export quantized the same way computes: same greedy tokens."""
    from precision.quantize import QuantizeOptions, quantize_export

    _, tok, _, _ = tiny_model("llama")
    config = GenerationConfig(max_new_tokens=16, eos_token_ids=())
    results = {}
    for form in (PORTABLE, BOTH):
        out = tmp_path / ("portable" if form.portable else "both")
        quantize_export(form_export("llama", form), out, QuantizeOptions(vision="fp32", **options))
        manifest = load_manifest(out)
        assert manifest.graphs["decoder"].form == form
        if not form.portable:
            assert manifest.quantization["decoder"]["backends"] == ["onnxruntime"]
        results[form] = [_generate(out, tok, p, config).sequences for p in PROMPTS]
    assert results[BOTH] == results[PORTABLE]


def test_check_says_first_that_the_form_is_onnxruntime_only(form_export) -> None:
    """`check` on a non-portable export leads with the form, not with the parser findings
    that follow from it; the portable export passes."""
    from trt.rules import check_export

    assert check_export(form_export("llama", PORTABLE), "10").ok
    report = check_export(form_export("llama", BOTH), "10")
    decoder = next(g for g in report.graphs if g.name == "decoder")
    first = decoder.findings[0]
    assert (first.rule, first.subject) == ("decoder-form", "inplace,in-graph")
    assert "--decoder-form portable" in report.format()
    vision = next(g for g in report.graphs if g.name == "vision")
    assert all(f.rule != "decoder-form" for f in vision.findings)


def test_w8a8_note_of_a_form_does_not_promise_tensorrt(form_export, tmp_path) -> None:
    """W8A8 is made for TensorRT; on a form TensorRT does not run, the CPU note says so."""
    from precision.quantize import QuantizeOptions, quantize_export
    from runtime.engine import W8A8_ON_CPU, slow_on_cpu

    out = tmp_path / "w8a8"
    options = QuantizeOptions(vision="fp32", decoder="int8", int8_mode="w8a8")
    quantize_export(form_export("llama", INPLACE), out, options)
    (note,) = slow_on_cpu(load_manifest(out))
    assert "TensorRT does not run" in note and "made for TensorRT" not in note
    assert note != W8A8_ON_CPU


@pytest.mark.parametrize("form", [PORTABLE, IN_GRAPH, INPLACE, BOTH], ids=str)
def test_one_token_steps_equal_one_prefill(tiny_model, form_export, form) -> None:
    """Tokens fed one step at a time after a prefill (the decode path: media state held between
    steps, feeds kept bound) give the logits of one prefill over the whole sequence: the rest
    of the prompt with its second `<image>` (host indices only: the in-graph rule indexes the
    last image from the first decode step on), then generated tokens with `<image>`s past the
    image count among them (they attend to the last image)."""
    _, tok, _, _ = tiny_model("llama")
    engine = OnnxFlamingo(form_export("llama", form))
    ids, mask, cross, n = _row_inputs(engine, tok, PROMPTS[0])  # 2 images
    media = engine.media_token_id
    rng = np.random.default_rng(0)
    forced = rng.integers(5, engine.dims.vocab_size - 5, 20)
    forced[[3, 4, 11]] = media
    full_ids = np.concatenate([ids, forced[None]], axis=1)
    full_mask = np.ones_like(full_ids)
    full_mask[:, : mask.shape[1]] = mask
    whole = engine.step_model(cross, n).run(full_ids, full_mask)  # (1, T, V)
    images = np.flatnonzero(ids[0] == media)
    # host indices: 3 one-token steps before image 2 (it changes a state held between steps)
    split = ids.shape[1] if form.indices == "in-graph" else int(images[1]) - 3
    model = engine.step_model(cross, n)
    stepped = [model.run(full_ids[:, :split], full_mask[:, :split])[:, -1]]
    for width in range(split + 1, full_ids.shape[1]):
        stepped.append(model.run(full_ids[:, width - 1 : width], full_mask[:, :width])[:, -1])
    positions = np.arange(split - 1, full_ids.shape[1] - 1)
    np.testing.assert_allclose(np.stack(stepped, 1), whole[:, positions], atol=1e-4, rtol=0)


@pytest.mark.parametrize("form", [PORTABLE, IN_GRAPH, INPLACE], ids=str)
@pytest.mark.parametrize("current_only", [True, False])
def test_reorders_between_steps_move_the_cross_attention_rows(
    tiny_model, form_export, form, current_only
) -> None:
    """StepModel used directly: rows swapped by reorder_cache between one-token steps attend
    to their own images at every step (a memo of the current-image K/V once answered for the
    rows' order before a gather: breaker pass, 2026-11-30), as a fresh model fed the rows in
    that order over the whole sequence does."""
    _, tok, _, _ = tiny_model("llama")
    engine = OnnxFlamingo(form_export("llama", form))
    prompts = ("<image>A red circle", "<image>A blue square")
    vision_x, ids, mask, counts = batch(tok, engine.dims.image_size, prompts)
    features = engine.encode_images(vision_x[:, 0, 0].numpy())
    cross = engine.rows_cross_kv(features, [[0], [1]])
    ids, mask, n = ids.numpy(), mask.numpy(), np.array(counts)
    model = engine.step_model(cross, n)
    model.current_image_only = current_only
    model.step(ids, mask)
    order, token = np.array([0, 1]), np.array([[5], [5]])
    for k in range(1, 5):
        model.reorder_cache(np.array([1, 0]))
        order = order[[1, 0]]
        ones = np.ones((2, k), dtype=np.int64)
        got = model.step(token, np.concatenate([mask, ones], 1))
        fresh = engine.step_model({name: v[order] for name, v in cross.items()}, n[order])
        history = np.concatenate([ids[order], np.repeat(token, k, axis=1)], 1)
        want = fresh.step(history, np.concatenate([mask[order], ones], 1))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"step {k}")


@pytest.mark.parametrize("form", [PORTABLE, INPLACE], ids=str)
def test_new_tokens_that_do_not_fit_the_cache_are_refused(tiny_model, form_export, form) -> None:
    """run/advance/step with a mask of the wrong length, a wrong batch or 3-D ids: a ValueError
    naming the shapes, before any run (the in-place form used to take a wrong-length mask and
    misplace its cache positions silently: breaker pass, 2026-11-30); the cache is unchanged."""
    _, tok, _, _ = tiny_model("llama")
    engine = OnnxFlamingo(form_export("llama", form))
    ids, mask, cross, n = _row_inputs(engine, tok, PROMPTS[0])
    model = engine.step_model(cross, n)
    model.step(ids, mask)
    length = model.past_length
    token = np.array([[5]])
    for call in (model.run, model.advance):
        for bad_mask in (mask, np.ones((1, length + 3), np.int64)):
            with pytest.raises(ValueError, match="do not fit a cache"):
                call(token, bad_mask)
    with pytest.raises(ValueError, match="cache's rows"):
        model.step(np.array([[5], [6]]), np.ones((2, length + 1), np.int64))
    with pytest.raises(ValueError, match="cache's rows"):
        model.step(np.array([[[5]]]), np.ones((1, length + 1), np.int64))
    assert model.past_length == length
    good = model.run(token, np.ones((1, length + 1), np.int64))
    assert good.shape[:2] == (1, 1) and model.past_length == length + 1
