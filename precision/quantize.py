"""Quantize an fp32 export folder into a new, complete export folder (fp16, int8, int4).

Precision is decided in the ONNX file (TensorRT 10 deprecates weak typing, 11 drops the
FP16/INT8 builder flags): each precision is a graph rewrite that onnxruntime runs as is and
TensorRT builds strongly typed; the manifest's spec records every I/O dtype.
* fp16: norm statistics stay fp32 (``DEFAULT_FP16_KEEP``): x**2 overflows fp16 above
  |x| = 256, and LLM hidden states carry outliers that large.
* int8 ``w8a8`` (default): symmetric Q/DQ, per-channel weights, per-tensor activations
  calibrated on few-shot episodes; weight GEMMs only. TensorRT's int8 GEMM form.
* int8 ``weight-only``: per-channel int8 weights behind DequantizeLinear, no calibration; the
  CPU form (onnxruntime fuses it into MatMulNBits, and runs W8A8 slower than fp32).
* int8 ``dynamic``: onnxruntime's dynamic quantization: per-channel int8 weights, activations
  quantized at run time, int8 GEMMs (VNNI) for the compute-bound vision and prefill on CPU;
  onnxruntime only.
* int4: weight-only, blockwise (32/64/128): blocked DequantizeLinear (opset 21, TensorRT 10+)
  or MatMulNBits (onnxruntime only). int8 and int4 keep embeddings int8 per row.
Written atomically like an export. Each form in detail: docs/quantization.md.
"""

from __future__ import annotations

import fnmatch
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx

from exporter.export import (
    ExportOptions,
    tool_versions,
)
from exporter.output import (
    check_free_space,
    check_output,
    make_work_folder,
    output_lock,
    unwinding_signals,
    writable_parent,
    write_atomically,
)
from runtime.manifest import GraphEntry, Manifest, load_manifest, safe_join
from runtime.spec import PORTABLE, DecoderForm, GraphSpec
from trt.graph_index import default_opset
from trt.rules import check_graph

from .graph import (
    IN_MEMORY,
    WeightStore,
    load_graph,
    matched_nodes,
    name_nodes,
    save_graph,
    spec_from_graph,
)
from .options import (
    Progress,
    QuantizeError,
    QuantizeOptions,
)
from .rewrites import (
    quiet_onnxruntime_tools,
    to_fp16,
    to_int4,
    to_int8,
    to_int8_dynamic,
    to_int8_weight_only,
)

# ------------------------------------------------------------------ the export folder


def rewrite_graph(
    model: onnx.ModelProto,
    name: str,
    options: QuantizeOptions,
    reader: Any,
    work: Path,
    weights: WeightStore = IN_MEMORY,
    *,
    form: DecoderForm = PORTABLE,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """An fp32 graph at `options.precision(name)`, and the record of how (manifest
    `quantization.<graph>`); refused when a TensorRT-bound result breaks the TensorRT rules.
    `reader`: the calibration feeds of a W8A8 int8 graph; `form`: the decoder form the graph
    has (a non-portable one is onnxruntime's alone)."""
    precision = options.precision(name)
    name_nodes(model)
    keep = matched_nodes(model, options.keep_nodes)
    info: dict[str, Any] = {"keep_nodes": keep} if keep else {}
    backends = list(form.backends)
    with quiet_onnxruntime_tools():
        if precision == "fp16":
            model, more = to_fp16(model, options.fp16_keep, keep, work, weights)
        elif precision == "int8" and options.int8_mode == "weight-only":
            model, more = to_int8_weight_only(model, options, keep, weights)
        elif precision == "int8" and options.int8_mode == "dynamic":
            model, more = to_int8_dynamic(model, options, keep, work)
        elif precision == "int8":
            model, more = to_int8(model, name, reader, options, keep, work)
        elif precision == "int4":
            model, more = to_int4(model, options, keep, work, weights)
        else:
            more = {}
    onnxruntime_only = (precision == "int4" and options.int4_format == "matmulnbits") or (
        precision == "int8" and options.int8_mode == "dynamic"
    )
    if onnxruntime_only:
        backends = [b for b in backends if b == "onnxruntime"]
    info.update(more)
    info["backends"] = backends
    if "tensorrt" in backends:
        violations = check_graph(model)
        if violations:
            listed = "; ".join(str(v) for v in violations[:3])
            raise QuantizeError(f"{name} graph at {precision} breaks TensorRT rules: {listed}")
    return model, info


def _check_source(src: Path, out: Path) -> Manifest:
    manifest = load_manifest(src)
    not_fp32 = {k: g.precision for k, g in manifest.graphs.items() if g.precision != "fp32"}
    if not_fp32:
        raise QuantizeError(
            f"{src} is not an fp32 export (graphs {not_fp32}); quantize the fp32 export instead"
        )
    if out.absolute().resolve() == src.absolute().resolve():
        raise QuantizeError("--output must be a new folder, not the source export")
    if src.absolute().resolve() in out.absolute().resolve().parents:
        raise QuantizeError("--output must not be inside the source export")
    return manifest


def _needs_readers(options: QuantizeOptions) -> bool:
    """W8A8 int8 graphs need calibration unless their ranges are cached."""
    for graph in ("vision", "decoder"):
        calibrated = options.precision(graph) == "int8" and options.int8_mode == "w8a8"
        cache = options.cache_file(graph)
        if calibrated and (cache is None or not cache.is_file()):
            return True
    return False


def _calibration_readers(
    src: Path, options: QuantizeOptions, say: Progress
) -> tuple[dict[str, Any], dict[str, Any]]:
    """FeedReaders for the graphs quantized to int8 (vision and/or decoder), and the record of
    the calibration set for the manifest."""
    from precision.collect import EpisodeRunner, FeedReader
    from precision.data import calibration_set

    cal = calibration_set(
        options.calibration,
        episodes=options.episodes,
        max_shots=options.max_shots,
        seed=options.seed,
        progress=say,
    )
    say(
        f"calibration set: {len(cal.episodes)} episodes from {cal.source!r} "
        f"(seed {cal.seed}, {cal.skipped} images skipped)"
    )
    runner = EpisodeRunner(src, decode_steps=options.decode_steps)
    n_images = sum(len(e.images) for e in cal.episodes)
    readers = {
        "vision": FeedReader(
            lambda: runner.vision_feeds(cal.episodes),
            "vision",
            -(-n_images // runner.image_batch),
            say,
            every=1,
        ),
        "decoder": FeedReader(
            lambda: runner.decoder_feeds(cal.episodes),
            "decoder",
            len(cal.episodes) * (1 + options.decode_steps),
            say,
        ),
    }
    return readers, cal.describe()


def quantize_export(
    src: str | Path,
    out: str | Path,
    options: QuantizeOptions,
    progress: Progress | None = None,
    source_record: dict[str, Any] | None = None,
) -> Manifest:
    """Write OUT: the export at SRC with each graph at its requested precision.
    `source_record` replaces the manifest's `quantization.source` (default: SRC and its file
    hashes), e.g. when SRC is a scratch folder that will not outlive the call."""
    say = progress or (lambda _m: None)
    options.validate()
    src, out = Path(src), Path(out)
    source = _check_source(src, out)
    check_output(out, options.force, inputs=[src])
    check_keep_nodes(src, source, options.keep_nodes)
    # the output is at most the source's size, and the int8/fp16 rewrites stage one copy of a
    # graph in the temporary folder: refuse a disk that cannot take that before the slow part
    check_free_space(out, sum(safe_join(src, f).stat().st_size for f in source.files))
    return write_atomically(
        out,
        options.force,
        lambda tmp: _quantize_into(src, source, tmp, options, say, source_record),
        say,
    )


def graph_node_names(path: Path) -> list[str]:
    """The node names quantization addresses (`name_nodes`), without loading the weights."""
    model = onnx.load(str(path), load_external_data=False)
    name_nodes(model)
    return [n.name for n in model.graph.node]


def check_keep_nodes(src: Path, source: Manifest, patterns: tuple[str, ...]) -> None:
    """Every `--keep-node` glob must match a node of some graph: a typo would otherwise quantize
    the node it meant to keep, silently."""
    if not patterns:
        return
    names = {g: graph_node_names(safe_join(src, e.file)) for g, e in source.graphs.items()}
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for ns in names.values() for n in ns):
            files = " or ".join(e.file for e in source.graphs.values())
            raise QuantizeError(
                f"--keep-node {pattern!r} matches no node in {files} (node names are listed by "
                "`flamingo-export sensitivity`; globs use *, ? and [...])"
            )


def written_graph(
    path: Path,
    model: onnx.ModelProto,
    fp32_spec: GraphSpec,
    precision: str,
    external: list[str],
    start: float,
    say: Progress,
    *,
    form: DecoderForm = PORTABLE,
) -> GraphEntry:
    """The manifest entry of a graph just written at `path` (checked by onnx's checker, I/O
    dtypes read from the graph), with a progress line of its size and time since `start`."""
    onnx.checker.check_model(str(path), full_check=False)
    spec = spec_from_graph(model, fp32_spec)
    size = sum((path.parent / f).stat().st_size for f in (path.name, *external))
    name = path.name.removesuffix(".onnx")
    say(f"{name} graph: {precision}, {size / 2**20:.2f} MiB in {time.perf_counter() - start:.1f} s")
    return GraphEntry(path.name, precision, default_opset(model), spec, external, form)


def _quantize_into(
    src: Path,
    source: Manifest,
    tmp: Path,
    options: QuantizeOptions,
    say: Progress,
    source_record: dict[str, Any] | None = None,
) -> Manifest:
    readers: dict[str, Any] = {}
    calibration: dict[str, Any] | None = None
    if _needs_readers(options):
        readers, calibration = _calibration_readers(src, options, say)
    graphs: dict[str, GraphEntry] = {}
    record: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix=".quantize-work-", dir=tmp))
    try:
        for name, entry in source.graphs.items():
            precision = options.precision(name)
            start = time.perf_counter()
            say(f"{name} graph: fp32 -> {precision}...")
            model = load_graph(safe_join(src, entry.file))
            model, info = rewrite_graph(
                model, name, options, readers.get(name), work, form=entry.form
            )
            path = tmp / entry.file
            external = save_graph(model, path)
            graphs[name] = written_graph(
                path, model, entry.spec, precision, external, start, say, form=entry.form
            )
            record[name] = info
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for rel in source.tokenizer_files:
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(safe_join(src, rel), dst)
    if calibration is not None:
        record["calibration"] = calibration
    if options.calibration_cache and "int8" in (options.vision, options.decoder):
        record["calibration_cache"] = str(options.calibration_cache)
    record["source"] = source_record or {
        "export": str(src.absolute()),
        "files": dict(source.files),
    }
    manifest = Manifest(
        model=source.model,
        special_tokens=source.special_tokens,
        preprocess=source.preprocess,
        graphs=graphs,
        limits=source.limits,
        tokenizer_files=list(source.tokenizer_files),
        tools=tool_versions(),
        quantization=record,
        prompt=source.prompt,
    )
    manifest.record_files(tmp)
    manifest.write(tmp)
    return manifest


# quantization.source of `export --precision P` when it exports fp32 first (W8A8, dynamic int8,
# forms not streamed): the scratch folder's path would name a folder that no longer exists
SCRATCH_ROUTE = "fp32 export in a scratch folder (deleted), then quantize"


def export_at_precision(
    model: Any,
    tokenizer: Any,
    out: str | Path,
    export_options: ExportOptions,
    options: QuantizeOptions,
    progress: Progress | None = None,
) -> Manifest:
    """`export --precision P`: the fp32 export written to a scratch folder beside OUT, then
    quantized into OUT (atomically, like every export); a plain export when all is fp32.

    `model`/`tokenizer` as `flamingo.loaders.load_flamingo` returns them. Raises ExportError
    (QuantizeError) before any export work when the options or OUT cannot be used.
    """
    from exporter.export import export_model

    out = Path(out)
    export_options.validate()
    options = replace(options, force=export_options.force)  # OUT is the export's to replace
    options.validate()
    if options.vision == options.decoder == "fp32":
        return export_model(model, tokenizer, out, export_options, progress=progress)
    from exporter.export import export_size

    check_output(out, options.force)
    # the fp32 export in the scratch folder, then OUT at most as large
    check_free_space(out, 2 * export_size(model))
    writable_parent(out)
    with unwinding_signals(), output_lock(out):
        check_output(out, options.force)
        scratch = make_work_folder(out, "fp32")
        try:
            export_model(model, tokenizer, scratch / "fp32", export_options, progress=progress)
            # the scratch folder is deleted below: record the route, not its path
            route = {"route": SCRATCH_ROUTE}
            return quantize_export(
                scratch / "fp32", out, options, progress=progress, source_record=route
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
