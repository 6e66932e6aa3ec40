"""The streaming export (precision/streaming.py) writes the same graphs as today's route (the
fp32 export, then quantize_export): the same files byte for byte, hence the same initializers
and the same outputs, on the tiny models of every LM family and on the demo model; with
placeholders everywhere, above the protobuf limit, with duplicate tensors, from every file
format the loaders read. It holds one parameter at a time, reports progress per tensor group
and leaves nothing behind when interrupted."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from cli.main import main
from exporter.export import ExportError, ExportOptions
from flamingo.lazy import LazyValueError, SourceFiles, read_lazy_state_dict
from flamingo.loaders import LoadError, load_flamingo, resolve_flamingo
from precision.quantize import SCRATCH_ROUTE, QuantizeError, QuantizeOptions, quantize_export
from precision.streaming import StreamedWeights, export_streaming, streams
from runtime.engine import make_session
from runtime.manifest import load_manifest
from runtime.spec import ModelDims
from tests.conftest import FAMILIES

# matrices stream from the checkpoint, vectors (norms, biases, gates) are traced with values
SMALL = 2048
QUICK = {"block_size": 32, "int8_mode": "weight-only"}
PRECISIONS = ("fp16", "int8", "int4")
ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo"


def _files(paths: Any, **kw: Any) -> dict[str, Any]:
    return {"lm_dir": paths.lm_dir, "vision_path": paths.vision_path,
            "checkpoint_path": paths.checkpoint_path, **kw}  # fmt: skip


def _stream(files: dict, out: Path, options: QuantizeOptions, **kw: Any) -> Path:
    export_streaming(files, out, ExportOptions(), options, small_bytes=kw.pop("small", SMALL), **kw)
    return out


def assert_same_export(reference: Path, streamed: Path) -> None:
    """Same files (sha256 of every graph, data and tokenizer file), same manifest but for the
    record of where the weights came from."""
    ref, got = load_manifest(reference), load_manifest(streamed)
    assert got.files == ref.files
    assert got.graphs == ref.graphs
    for field in ("model", "special_tokens", "preprocess", "limits", "tokenizer_files"):
        assert getattr(got, field) == getattr(ref, field), field
    strip = lambda q: {k: v for k, v in q.items() if k != "source"}  # noqa: E731
    assert strip(got.quantization) == strip(ref.quantization)
    assert got.quantization["source"]["route"] == "streamed"


def assert_same_outputs(reference: Path, streamed: Path) -> None:
    """Both graphs of both exports on the same inputs (a 2-image prefill): equal outputs."""
    manifest = load_manifest(reference)
    dims = ModelDims.from_config(manifest.model)
    rng = np.random.default_rng(0)
    sizes = {"num_images": 2, "num_frames": 1, "batch": 1, "sequence": 4, "past_sequence": 0,
             "total_sequence": 4, "media_keys": 2 * dims.num_latents,
             "logits_positions": 1}  # fmt: skip
    for entry in manifest.graphs.values():
        feed = {}
        for t in entry.spec.inputs:
            shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
            if t.name == "logits_index":
                feed[t.name] = np.array([3])
            elif t.dtype == "int64":
                feed[t.name] = np.ones(shape, dtype=np.int64)
            else:
                feed[t.name] = rng.standard_normal(shape).astype(t.dtype)
        outs = [make_session(d / entry.file, ["CPUExecutionProvider"], None).run(None, feed)
                for d in (reference, streamed)]  # fmt: skip
        for a, b in zip(*outs):
            np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def reference(tiny_export: Callable, tmp_path_factory: pytest.TempPathFactory) -> Callable:
    """reference(family, **options): today's route, the fp32 export quantized."""
    cache: dict[tuple, Path] = {}

    def make(family: str, **kw: Any) -> Path:
        key = (family, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ref-{family}") / "out"
            quantize_export(tiny_export(family), out, QuantizeOptions(**{**QUICK, **kw}))
            cache[key] = out
        return cache[key]

    return make


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_graphs_equal_the_fp32_then_quantize_route(
    tiny_paths: Callable, reference: Callable, tmp_path: Path, family: str, precision: str
) -> None:
    options = QuantizeOptions(vision=precision, decoder=precision, **QUICK)
    out = _stream(_files(tiny_paths(family)), tmp_path / "out", options)
    ref = reference(family, vision=precision, decoder=precision)
    assert_same_export(ref, out)
    if family == "mpt":
        assert_same_outputs(ref, out)


@pytest.mark.parametrize(
    "kw",
    [
        {"vision": "fp16", "decoder": "fp16", "fp16_keep": ("norm", "softmax", "logits")},
        {"vision": "fp32", "decoder": "int4", "int4_format": "matmulnbits"},
        {"vision": "int8", "decoder": "int4", "keep_nodes": ("/lm/layers.1/*",)},
        {"vision": "int4", "decoder": "int8", "quantize_embeddings": False},
    ],
    ids=["fp16-keep-all", "matmulnbits", "keep-nodes", "no-embeddings"],
)
def test_streamed_options_equal_the_fp32_route(
    tiny_paths: Callable, reference: Callable, tmp_path: Path, kw: dict
) -> None:
    options = QuantizeOptions(**{**QUICK, **kw})
    out = _stream(_files(tiny_paths("mpt")), tmp_path / "out", options, small=0)  # all streamed
    assert_same_export(reference("mpt", **kw), out)


def test_graphs_over_the_protobuf_limit_stream_into_the_same_data_files(
    tiny_paths: Callable, tiny_export: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both routes' >2 GB branches (external data, fp16 conversion and opset conversion of a
    large graph), run on the tiny model by lowering the limit."""
    from precision import graph

    monkeypatch.setattr(graph, "ONNX_PROTO_LIMIT", (64 << 20) + 1)
    for precision in ("fp16", "int4"):
        options = QuantizeOptions(vision=precision, decoder=precision, **QUICK)
        ref = tmp_path / f"ref-{precision}"
        quantize_export(tiny_export("mpt"), ref, options)
        out = _stream(_files(tiny_paths("mpt")), tmp_path / precision, options)
        assert load_manifest(out).graphs["decoder"].external_data == ["decoder.onnx.data"]
        assert_same_export(ref, out)


def test_identical_tensors_are_stored_once_as_by_the_fp32_export(
    tiny_paths: Callable, tmp_path: Path
) -> None:
    """torch's export stores equal initializers once (an Identity for the copy); an untrained
    checkpoint has many (norm weights of ones). Streamed large duplicates are found by their
    values and traced again with them."""
    paths = tiny_paths("llama")
    root = tmp_path / "model"
    shutil.copytree(paths.root, root)
    lm = root / paths.lm_dir.relative_to(paths.root)
    sd = load_file(str(lm / "model.safetensors"))
    norm = "model.layers.{}.post_attention_layernorm.weight"
    sd[norm.format(2)] = torch.ones_like(sd[norm.format(2)])
    sd[norm.format(3)] = torch.ones_like(sd[norm.format(3)])
    up = "model.layers.{}.mlp.up_proj.weight"
    sd[up.format(2)] = sd[up.format(1)].clone()
    save_file(sd, str(lm / "model.safetensors"), metadata={"format": "pt"})
    files = {"lm_dir": lm, "vision_path": root / paths.vision_path.relative_to(paths.root),
             "checkpoint_path": root / paths.checkpoint_path.relative_to(paths.root)}  # fmt: skip
    model, tok, _ = load_flamingo(**files)
    from exporter.export import export_model

    export_model(model, tok, tmp_path / "fp32", progress=None)
    options = QuantizeOptions(vision="int4", decoder="int4", **QUICK)
    quantize_export(tmp_path / "fp32", tmp_path / "ref", options)
    said: list[str] = []
    out = _stream(files, tmp_path / "out", options, progress=said.append)
    assert_same_export(tmp_path / "ref", out)
    assert any("identical large tensors" in m for m in said)


def test_every_weight_file_format_streams(
    tiny_paths: Callable, tmp_path: Path, reference: Callable
) -> None:
    """HF CLIP directory (q/k/v concatenated from three tensors), the LM as sharded .bin with
    an index, the checkpoint as a training save (model_state_dict, `module.` prefixes)."""
    paths = tiny_paths("mpt")
    lm = tmp_path / "lm"
    shutil.copytree(paths.lm_dir, lm)
    sd = load_file(str(lm / "model.safetensors"))
    (lm / "model.safetensors").unlink()
    keys = sorted(sd)
    shards = {"pytorch_model-1.bin": keys[::2], "pytorch_model-2.bin": keys[1::2]}
    for shard, names in shards.items():
        torch.save({k: sd[k] for k in names}, lm / shard)
    index = {"weight_map": {k: s for s, names in shards.items() for k in names}}
    (lm / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    ckpt = torch.load(paths.checkpoint_path, weights_only=True)
    training = {"model_state_dict": {f"module.{k}": v for k, v in ckpt.items()}}
    torch.save(training, tmp_path / "checkpoint.pt")
    files = {"lm_dir": lm, "vision_path": paths.vision_hf_dir,
             "checkpoint_path": tmp_path / "checkpoint.pt"}  # fmt: skip
    model, tok, _ = load_flamingo(**files)
    from exporter.export import export_model

    export_model(model, tok, tmp_path / "fp32", progress=None)
    options = QuantizeOptions(vision="int8", decoder="int4", **QUICK)
    quantize_export(tmp_path / "fp32", tmp_path / "ref", options)
    out = _stream(files, tmp_path / "out", options, small=0)
    assert_same_export(tmp_path / "ref", out)


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
def test_demo_model_streams_to_the_same_graphs(
    demo_export: Path, tmp_path: Path, precision: str
) -> None:
    """The trained demo model (safetensors LM, vision and checkpoint), every weight streamed."""
    files = {"lm_dir": DEMO / "lm", "vision_path": DEMO / "open_clip_model.safetensors",
             "checkpoint_path": DEMO / "checkpoint.safetensors"}  # fmt: skip
    options = QuantizeOptions(precision, precision, int8_mode="weight-only")
    out = _stream(files, tmp_path / "out", options, small=0)
    quantize_export(demo_export, tmp_path / "ref", options)
    assert_same_export(tmp_path / "ref", out)
    assert_same_outputs(tmp_path / "ref", out)


def test_one_parameter_at_a_time_with_progress_per_tensor_group(
    tiny_paths: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most two parameters alive at once (one kept for its next view, one read), each
    source tensor read once, and a progress line per layer."""
    live: set[int] = set()
    most = [0]
    original = StreamedWeights._param

    def tracked(self: StreamedWeights, key: str) -> torch.Tensor:
        value = original(self, key)
        if id(value) not in live:
            live.add(id(value))
            weakref.finalize(value, live.discard, id(value))
        most[0] = max(most[0], len(live))
        return value

    monkeypatch.setattr(StreamedWeights, "_param", tracked)
    read = []
    monkeypatch.setattr(SourceFiles, "close", lambda self: read.append(self.bytes_read))
    said: list[str] = []
    paths = tiny_paths("llama")
    options = QuantizeOptions(vision="int4", decoder="int4", **QUICK)
    _stream(_files(paths), tmp_path / "out", options, small=0, progress=said.append)
    assert 1 <= most[0] <= 2
    model, _, _ = load_flamingo(paths.lm_dir, paths.vision_path, paths.checkpoint_path)
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert read[0] <= fp32_bytes  # nothing read twice (the LM is stored fp32 in the fixture)
    groups = [m for m in said if "tensor groups" in m]
    for layer in range(model.cfg.lm.num_layers):
        assert sum(f": lang_model.layers.{layer} (" in m for m in groups) == 1
    assert any(": vision_encoder.transformer.resblocks.0 (" in m for m in groups)
    # the trace of the structure: a line per block as torch runs it, then per stage
    blocks = {"decoder": model.cfg.lm.num_layers + len(model.lang_model.cross_attn_layer_indices),
              "vision": model.cfg.vision.layers}  # fmt: skip
    for graph, count in blocks.items():
        traced = [m for m in said if m.startswith(f"{graph} graph: traced ")]
        assert len(traced) == count
        assert f"({count}/{count} blocks, " in traced[-1]
    assert sum(m.startswith("decoder graph: ONNX shape inference, pass ") for m in said) >= 1
    assert sum(m.startswith("decoder graph: structure traced in ") for m in said) == 1


def test_export_json_keeps_stdout_one_object(tiny_paths: Callable, tmp_path: Path) -> None:
    """`export --json` on the streamed route: progress on stderr, one JSON object on stdout."""
    paths = tiny_paths("mpt")
    result = CliRunner().invoke(main, [
        "export", "--lm", str(paths.lm_dir), "--vision", str(paths.vision_path),
        "--checkpoint", str(paths.checkpoint_path), "--precision", "int4", "--json",
        "-o", str(tmp_path / "out"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["graphs"]["decoder"]["precision"] == "int4"
    assert "decoder graph: traced lang_model.layers.0 (" in result.stderr


def test_an_interrupted_streaming_export_leaves_nothing(
    tiny_paths: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = [0]
    original = StreamedWeights.fp32

    def interrupt(self: StreamedWeights, name: str) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 12:
            raise KeyboardInterrupt
        return original(self, name)

    monkeypatch.setattr(StreamedWeights, "fp32", interrupt)
    parent = tmp_path / "exports"
    with pytest.raises(KeyboardInterrupt):
        _stream(_files(tiny_paths("mpt")), parent / "out",
                QuantizeOptions("int4", "int4", **QUICK), small=0)  # fmt: skip
    assert calls[0] == 12 and list(parent.iterdir()) == []


def _streaming_writer(files: dict, out: Path, force: bool = False) -> subprocess.Popen:
    """A process streaming an int4 export of `files` to OUT that prints "streaming" and waits
    once it reads weights (inside its temporary folder), as tests/exporter/test_output.py's
    writers wait in their build."""
    paths = {k: str(v) for k, v in files.items()}
    code = f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from exporter.export import ExportOptions
        from precision.quantize import QuantizeOptions
        from precision.streaming import export_streaming
        def progress(message):
            if "tensor groups" in message:
                sys.__stdout__.write("streaming\\n")  # quantize redirects stdout while rewriting
                sys.__stdout__.flush()
                time.sleep(60)
        files = {{k: Path(v) for k, v in {paths!r}.items()}}
        export_streaming(files, Path({str(out)!r}), ExportOptions(force={force}),
                         QuantizeOptions("int4", "int4", block_size=32), progress, small_bytes=0)
    """
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.slow
def test_signals_while_streaming_leave_nothing_behind(tiny_paths: Callable, tmp_path: Path) -> None:
    """SIGTERM while weights stream: exit 128 + 15 and nothing left beside OUT; SIGKILL: the
    next export to OUT reclaims the killed writer's folder; an existing OUT replaced with
    --force is still the old export after either."""
    files = _files(tiny_paths("mpt"))
    parent = tmp_path / "exports"
    parent.mkdir()
    out = parent / "OUT"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        writer = _streaming_writer(files, out)
        assert writer.stdout is not None and writer.stdout.readline().strip() == "streaming"
        assert any(p.name.startswith(".OUT.tmp-") for p in parent.iterdir())
        writer.send_signal(sig)
        assert writer.wait() == (128 + signal.SIGTERM if sig == signal.SIGTERM else -sig)
        if sig == signal.SIGTERM:
            assert list(parent.iterdir()) == []
    export_streaming(files, out, ExportOptions(), QuantizeOptions("fp16", "fp16"))
    assert [p.name for p in parent.iterdir()] == ["OUT"]  # the killed writer's folder reclaimed
    before = load_manifest(out).files
    for sig in (signal.SIGTERM, signal.SIGKILL):
        writer = _streaming_writer(files, out, force=True)
        assert writer.stdout is not None and writer.stdout.readline().strip() == "streaming"
        writer.send_signal(sig)
        writer.wait()
        assert load_manifest(out).files == before


def test_streaming_refuses_what_it_cannot_write(tiny_paths: Callable, tmp_path: Path) -> None:
    files = _files(tiny_paths("mpt"))
    assert not streams(QuantizeOptions("int8", "int8"))  # W8A8 calibrates on the fp32 graphs
    assert not streams(QuantizeOptions("fp32", "fp32"))
    assert streams(QuantizeOptions("fp32", "int8", int8_mode="weight-only"))
    # dynamic int8 is onnxruntime's quantize_dynamic over the whole fp32 graph
    assert not streams(QuantizeOptions("fp32", "int8", int8_mode="dynamic"))
    with pytest.raises(QuantizeError, match="W8A8"):
        _stream(files, tmp_path / "a", QuantizeOptions("int8", "int8"))
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(ExportError, match="already exists"):
        _stream(files, out, QuantizeOptions("int4", "int4"))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(LoadError, match=r"broken\.pt: cannot read weights"):
        _stream({**files, "checkpoint_path": broken}, tmp_path / "b", QuantizeOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt", "exists"]


def test_lazy_tensors_know_shapes_and_refuse_values(tiny_paths: Callable) -> None:
    """The loaders' checks run on lazy tensors; a check that needs values says so."""
    paths = tiny_paths("mpt")
    resolved = resolve_flamingo(**_files(paths), reader=read_lazy_state_dict)
    eager = resolve_flamingo(**_files(paths))
    assert resolved.config == eager.config and resolved.tensors.keys() == eager.tensors.keys()
    files = SourceFiles()
    for key, value in eager.tensors.items():
        lazy = resolved.tensors[key]
        assert lazy.shape == value.shape and lazy.dtype == value.dtype
        assert torch.equal(files.materialize(lazy), value), key
    lazy = next(iter(resolved.tensors.values()))
    with pytest.raises(LazyValueError, match="read lazily"):
        bool(lazy.sum() > 0)
    with pytest.raises(LazyValueError, match="in-place"):
        lazy.mul_(2)


def test_export_command_streams_reduced_precisions(tiny_paths: Callable, tmp_path: Path) -> None:
    paths = tiny_paths("mpt")
    model = ["--lm", str(paths.lm_dir), "--vision", str(paths.vision_path),
             "--checkpoint", str(paths.checkpoint_path)]  # fmt: skip
    for flags, route in (
        (["--precision", "int4"], "streamed"),
        (["--precision", "int8", "--int8-mode", "weight-only"], "streamed"),
        # W8A8: fp32 first, in a scratch folder whose path is not recorded (it is deleted)
        (["--precision", "int8", "--calibration-episodes", "1"], SCRATCH_ROUTE),
    ):
        out = tmp_path / "-".join(flags[1:3])
        result = CliRunner().invoke(main, ["export", *model, *flags, "-o", str(out), "-q"])
        assert result.exit_code == 0, result.output
        assert load_manifest(out).quantization["source"].get("route") == route
        assert "export" not in load_manifest(out).quantization["source"]


IDEFICS_VARIANTS = {
    # decoupled embedding and head (each the concatenation of two source tensors), vector
    # gates, no resampler, sharded .bin
    "decoupled-bin": dict(use_resampler=False, alpha_type="vector", cross_layer_interval=2,
                          decoupled=True, shards=True, safetensors=False),
    # resampler (k/v projections concatenated into to_kv) with q/k norms, safetensors shards
    "resampler-safetensors": dict(qk_layer_norms=True, qk_layer_norms_perceiver=True,
                                  shards=True),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(IDEFICS_VARIANTS))
def test_idefics_folders_stream_to_the_same_graphs(tmp_path: Path, variant: str) -> None:
    """An IDEFICS folder streams: a graph tensor built from several source tensors (the
    decoupled embedding and head, HF CLIP's q/k/v, the resampler's k/v) is read from its parts
    when written; same files and outputs as export + quantize, manifest's IDEFICS prompt and
    preprocessing included."""
    from exporter.export import export_model
    from fixtures.idefics import build_tiny_idefics
    from flamingo.idefics import load_idefics

    folder = build_tiny_idefics(tmp_path / "idefics", **IDEFICS_VARIANTS[variant])
    model, tok, _ = load_idefics(folder)
    export_model(model, tok, tmp_path / "fp32", progress=None)
    del model
    for precision in PRECISIONS:
        options = QuantizeOptions(vision=precision, decoder=precision, **QUICK)
        ref = tmp_path / f"ref-{precision}"
        quantize_export(tmp_path / "fp32", ref, options)
        out = _stream({"model_dir": folder}, tmp_path / precision, options)
        assert_same_export(ref, out)
        assert load_manifest(out).prompt == load_manifest(ref).prompt
        assert load_manifest(out).prompt["format"] == "idefics"
        assert_same_outputs(ref, out)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["in-graph", "inplace", "in-graph,inplace"])
def test_decoder_forms_stream_to_the_same_graphs(
    tiny_model: Callable, tiny_paths: Callable, tmp_path: Path, form: str
) -> None:
    """A non-portable decoder form is the same rewrite of the traced structure as export
    applies to its file: same files and outputs as export with the form + quantize."""
    from exporter.export import export_model
    from runtime.spec import DecoderForm

    parsed = DecoderForm.parse(form)
    model, tok, _, paths = tiny_model("llama")
    export_model(model, tok, tmp_path / "fp32", ExportOptions(decoder_form=parsed), progress=None)
    for precision in ("fp16", "int4"):
        options = QuantizeOptions(vision=precision, decoder=precision, **QUICK)
        ref = tmp_path / f"ref-{precision}"
        quantize_export(tmp_path / "fp32", ref, options)
        out = tmp_path / precision
        export_streaming(_files(paths), out, ExportOptions(decoder_form=parsed), options,
                         small_bytes=SMALL)  # fmt: skip
        assert load_manifest(out).graphs["decoder"].form == parsed
        assert_same_export(ref, out)


def test_export_command_streams_forms_and_idefics(tiny_paths, tmp_path) -> None:
    """`export --precision` streams a non-portable decoder form (keeping the form) and an
    IDEFICS folder (keeping its prompt format)."""
    from click.testing import CliRunner

    from cli.main import main
    from fixtures.idefics import build_tiny_idefics
    from runtime.manifest import load_manifest

    p = tiny_paths("llama")
    runner = CliRunner()
    out = tmp_path / "form"
    result = runner.invoke(main, [
        "export", "--lm", str(p.lm_dir), "--vision", str(p.vision_path),
        "--checkpoint", str(p.checkpoint_path), "--precision", "fp16",
        "--decoder-form", "in-graph", "-o", str(out), "-q",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    assert manifest.graphs["decoder"].precision == "fp16"
    assert not manifest.graphs["decoder"].form.portable
    assert manifest.quantization["source"]["route"] == "streamed"
    folder = build_tiny_idefics(tmp_path / "idefics", use_resampler=False)
    result = runner.invoke(
        main, ["export", "--model", str(folder), "--precision", "fp16", "-o", str(tmp_path / "i")]
    )
    assert result.exit_code == 0, result.output
    assert load_manifest(tmp_path / "i").prompt["format"] == "idefics"
    assert load_manifest(tmp_path / "i").quantization["source"]["route"] == "streamed"
