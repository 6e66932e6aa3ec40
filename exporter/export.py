"""Split a Flamingo model into the two ONNX graphs edge runtimes execute, plus tokenizer + manifest.

Graph I/O comes from runtime.spec (the shared contract). The export is written into a temporary
folder beside OUT and renamed into place only when complete, so an interrupted or failed export
never leaves a partial OUT behind.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from flamingo.config import FlamingoConfig
from flamingo.model import Flamingo
from runtime.images import PreprocessConfig
from runtime.manifest import GraphEntry, Manifest
from runtime.spec import (
    BATCH,
    LOGITS_POSITIONS,
    MEDIA_KEYS,
    NUM_FRAMES,
    NUM_IMAGES,
    PAST_SEQUENCE,
    PORTABLE,
    SEQUENCE,
    TOTAL_SEQUENCE,
    DecoderForm,
    GraphSpec,
    ModelDims,
    decoder_spec,
    trained_context,
    vision_spec,
)

from .output import (  # noqa: F401  (the atomic-output API, used through this module too)
    ExportError,
    check_free_space,
    check_output,
    publish,
    write_atomically,
)

# The TorchScript-based exporter covers opsets 14-20 (LayerNormalization is native from 17).
MIN_OPSET, MAX_OPSET = 14, 20
DEFAULT_OPSET = 17  # portable to JetPack 5 (TensorRT 8.5) and later
ONNX_PROTO_LIMIT = 2 * 1024**3


Progress = Callable[[str], None]


def stderr_progress(message: str) -> None:
    print(f"[flamingo-export] {message}", file=sys.stderr, flush=True)


# The max_seq_len an export gets when the LM's context is longer: TensorRT profiles, the KV
# buffers and memory plans are sized from it, and edge devices rarely hold more.
DEFAULT_MAX_SEQ_LEN = 2048
# No export may declare more, whatever the LM (ALiBi extrapolates without a bound).
MAX_SEQ_LEN = 1 << 20


@dataclass
class ExportOptions:
    opset: int = DEFAULT_OPSET
    max_images: int = 32
    # None: the LM's context (max_position_embeddings), at most DEFAULT_MAX_SEQ_LEN
    max_seq_len: int | None = None
    # frames per media item (clips); None: the model's max_num_frames (frame embeddings), else 1
    max_frames: int | None = None
    force: bool = False
    # the decoder's form (runtime.spec.DecoderForm; exporter/decoder_forms.py rewrites into it)
    decoder_form: DecoderForm = PORTABLE

    def validate(self) -> None:
        """What can be refused before the model is loaded (with_model checks against it)."""
        for name in ("opset", "max_images", "max_seq_len", "max_frames"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ExportError(f"--{name.replace('_', '-')} must be an int, got {value!r}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ExportError(
                f"--opset {self.opset} is not supported: the exporter writes opsets "
                f"{MIN_OPSET}-{MAX_OPSET} (17 is the TensorRT 8.5+ portable default; int4 "
                "blocked DequantizeLinear needs opset 21 and is added by `quantize`)"
            )
        if self.max_images < 1:
            raise ExportError(f"--max-images must be >= 1, got {self.max_images}")
        self.decoder_form.validate()
        if self.max_seq_len is not None and not 2 <= self.max_seq_len <= MAX_SEQ_LEN:
            raise ExportError(
                f"--max-seq-len must be in [2, {MAX_SEQ_LEN}], got {self.max_seq_len}"
            )
        if self.max_frames is not None and self.max_frames < 1:
            raise ExportError(f"--max-frames must be >= 1, got {self.max_frames}")

    def with_model(self, model_cfg: dict[str, Any], say: Progress) -> ExportOptions:
        """These options with max_seq_len checked against (or defaulted from) the LM's context:
        positions a rotary LM was never trained on are refused; an ALiBi LM (MPT) extrapolates,
        so a longer limit only warns. Also refuses more images than tokens (each image needs
        its `<image>` token)."""
        self.validate()
        trained, extrapolates = trained_context(model_cfg)
        family = model_cfg["lm"]["family"]
        seq = self.max_seq_len
        if seq is None:
            seq = min(trained or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
        elif trained is not None and seq > trained:
            if not extrapolates:
                raise ExportError(
                    f"--max-seq-len {seq} exceeds the language model's context: this {family} "
                    f"LM was trained on {trained} positions (max_position_embeddings) and later "
                    f"ones are not reliable; use at most {trained}"
                )
            say(
                f"warning: --max-seq-len {seq} is beyond the {trained} positions this {family} "
                f"LM was trained on; its ALiBi attention extrapolates, but answers past {trained} "
                "tokens are not validated"
            )
        if self.max_images > seq:
            raise ExportError(
                f"--max-images {self.max_images} exceeds max_seq_len {seq}: every image takes "
                "an <image> token"
            )
        return replace(self, max_seq_len=seq, max_frames=self._frames(model_cfg))

    def _frames(self, model_cfg: dict[str, Any]) -> int:
        """max_frames: at most the frame embeddings the checkpoint has (a clip's frame f gets
        embedding f); a model without them (the released ones) takes clips only when asked,
        its frames then unordered for the resampler."""
        embedded = model_cfg["resampler"].get("max_num_frames")
        if self.max_frames is None:
            return embedded or 1
        if embedded is not None and self.max_frames > embedded:
            raise ExportError(
                f"--max-frames {self.max_frames} exceeds the {embedded} frame embeddings of "
                f"this checkpoint (perceiver.frame_embs, max_num_frames {embedded})"
            )
        return self.max_frames


class VisionGraph(nn.Module):
    """pixel_values (N, F, 3, S, S) of N media items of F frames -> their latents and every
    cross-attention layer's K/V over them."""

    def __init__(self, model: Flamingo) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        latents = self.model.encode_media(pixel_values)
        flat = [t for kv in self.model.lang_model.media_kv(latents) for t in kv]
        return (latents, *flat)


class DecoderGraph(nn.Module):
    """FlamingoLM with flat positional inputs/outputs in the order of runtime.spec."""

    def __init__(self, model: Flamingo) -> None:
        super().__init__()
        self.lm = model.lang_model
        self.num_xattn = len(self.lm.cross_attn_layer_indices)
        self.uses_position_ids = model.cfg.lm.uses_position_ids

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = list(args)
        input_ids, attention_mask = args.pop(0), args.pop(0)
        position_ids = args.pop(0) if self.uses_position_ids else None
        media_index, logits_index = args.pop(0), args.pop(0)
        xkv = [(args[2 * j], args[2 * j + 1]) for j in range(self.num_xattn)]
        rest = args[2 * self.num_xattn :]
        past = [(rest[2 * i], rest[2 * i + 1]) for i in range(len(rest) // 2)]
        logits, present = self.lm(
            input_ids, attention_mask, media_index, xkv, past, position_ids, logits_index
        )
        return (logits, *[t for kv in present for t in kv])


def example_inputs(
    spec: GraphSpec, sizes: dict[str, int], dtype: torch.dtype, vocab_size: int = 100
) -> tuple:
    """Tracing inputs with every dynamic dimension >= 2 (so none is specialised); token ids
    below `vocab_size`."""
    out = []
    for t in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
        if t.name == "input_ids":
            out.append(torch.randint(0, min(100, vocab_size), shape))
        elif t.name == "attention_mask":
            out.append(torch.ones(shape, dtype=torch.int64))
        elif t.name == "position_ids":
            past = sizes[PAST_SEQUENCE]
            out.append(torch.arange(past, past + shape[1]).expand(shape).contiguous())
        elif t.name == "media_index":
            out.append(torch.ones(shape, dtype=torch.int64))
        elif t.name == "logits_index":  # the last positions of the new tokens
            out.append(torch.arange(sizes[SEQUENCE] - shape[0], sizes[SEQUENCE]))
        else:
            out.append(torch.randn(shape, dtype=dtype))
    return tuple(out)


def _attribute_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Tensors held by node attributes (Constant values), subgraphs included."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                yield from sub.initializer
                yield from _attribute_tensors(sub)


def _read_external(tensor: onnx.TensorProto, folder: Path) -> tuple[str, bytes]:
    info = {e.key: e.value for e in tensor.external_data}
    with open(folder / info["location"], "rb") as f:
        if "offset" in info:
            f.seek(int(info["offset"]))
        return info["location"], f.read(int(info["length"])) if "length" in info else f.read()


def consolidate_external_data(onnx_path: Path, data_name: str) -> list[str]:
    """Put all external tensors in one `<graph>.onnx.data` file beside the graph.

    TorchScript export of a >2 GB model writes one file per tensor, initializers and Constant
    node values alike; this streams the initializers into a single file with relative locations,
    reading one tensor at a time (no second model copy), and puts the (small) Constant values
    back inline so the graph reads like a small export and the manifest lists every file.
    Returns the data file names used (empty for a self-contained graph).
    """
    model = onnx.load(str(onnx_path), load_external_data=False)
    folder = onnx_path.parent
    moved: list[str] = []
    offset = 0
    for tensor in _attribute_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location, tensor.raw_data = _read_external(tensor, folder)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            moved.append(location)
    with open(folder / data_name, "wb") as data:
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            location, payload = _read_external(tensor, folder)
            pad = (-offset) % 64  # keep tensors aligned for mmap
            data.write(b"\0" * pad)
            offset += pad
            data.write(payload)
            del tensor.external_data[:]
            for key, value in (
                ("location", data_name),
                ("offset", offset),
                ("length", len(payload)),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            offset += len(payload)
            if location != data_name:
                moved.append(location)
    if offset == 0:
        (folder / data_name).unlink()
    if offset or moved:
        onnx.save(model, str(onnx_path))
    for name in set(moved):
        (folder / name).unlink(missing_ok=True)
    return [data_name] if offset else []


def torch_onnx_export(
    module: nn.Module,
    args: tuple,
    spec: GraphSpec,
    path: Path,
    opset: int,
    export_params: bool = True,
) -> None:
    """The one torch.onnx call of every export (exporter.skeleton traces the same graph with
    export_params=False)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,
            export_params=export_params,
        )


def trace_sizes(dims: ModelDims) -> dict[str, int]:
    """The dynamic dimensions of the tracing inputs (every one >= 2, none specialised)."""
    return {
        NUM_IMAGES: 3,
        NUM_FRAMES: 2,
        BATCH: 2,
        SEQUENCE: 5,
        PAST_SEQUENCE: 3,
        TOTAL_SEQUENCE: 8,
        MEDIA_KEYS: 2 * dims.num_latents,
        LOGITS_POSITIONS: 2,
    }


def graph_modules(model: Flamingo, io_dtype: str) -> list[tuple[str, GraphSpec, nn.Module]]:
    """(name, spec, module) of the two graphs, in export order."""
    dims = ModelDims.from_config(model.cfg.to_dict())
    return [
        ("vision", vision_spec(dims, io_dtype), VisionGraph(model)),
        ("decoder", decoder_spec(dims, io_dtype), DecoderGraph(model)),
    ]


def export_graph(
    module: nn.Module, args: tuple, spec: GraphSpec, path: Path, opset: int
) -> list[str]:
    """torch.onnx (TorchScript exporter: it writes opset 17) -> checked ONNX file at path.

    Memory: a graph under 2 GB is built in memory by torch (several copies of its weights at
    the peak: docs/measurements.md); above, torch writes each tensor straight to its own file.
    Only then is there anything to consolidate, so a self-contained graph is never parsed back
    whole here.
    """
    before = set(path.parent.iterdir())
    torch_onnx_export(module, args, spec, path, opset)
    written = set(path.parent.iterdir()) - before - {path}
    external = consolidate_external_data(path, path.name + ".data") if written else []
    # by path: the checker reads the graph without its external data, so a >2 GB model is
    # checked (and shape-inferred) without loading its weights
    onnx.checker.check_model(str(path), full_check=True)
    return external


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": sys.version.split()[0]}
    for dist in ("flamingo-export", "torch", "transformers", "onnx", "onnxruntime", "tokenizers"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "absent"
    return versions


def export_size(model: nn.Module) -> int:
    """Bytes the two graphs will take, about: every parameter once (tied weights once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def export_model(
    model: Flamingo,
    tokenizer: Any,
    out: str | Path,
    options: ExportOptions | None = None,
    progress: Progress | None = stderr_progress,
) -> Manifest:
    """Write OUT/{vision.onnx, decoder.onnx, tokenizer/, manifest.json} for a loaded model."""
    say = progress or (lambda _message: None)
    options = (options or ExportOptions()).with_model(model.cfg.to_dict(), say)
    check_output(Path(out), options.force)
    check_free_space(Path(out), export_size(model))
    return write_atomically(
        Path(out), options.force, lambda tmp: _export_into(model, tokenizer, tmp, options, say), say
    )


def _export_into(
    model: Flamingo, tokenizer: Any, tmp: Path, options: ExportOptions, say: Progress
) -> Manifest:
    model = model.eval()
    cfg = model.cfg.to_dict()
    dims = ModelDims.from_config(cfg)
    dtype = next(model.parameters()).dtype
    io_dtype = {torch.float32: "float32", torch.float16: "float16"}[dtype]
    sizes = trace_sizes(dims)
    graphs: dict[str, GraphEntry] = {}
    with torch.no_grad():
        for name, spec, module in graph_modules(model, io_dtype):
            start = time.perf_counter()
            say(f"exporting {name} graph (opset {options.opset})...")
            path = tmp / f"{name}.onnx"
            external = export_graph(
                module,
                example_inputs(spec, sizes, dtype, dims.vocab_size),
                spec,
                path,
                options.opset,
            )
            form = options.decoder_form if name == "decoder" else PORTABLE
            if not form.portable:
                from .decoder_forms import rewrite_graph_file

                rewrite_graph_file(path, form, cfg, {"media_token_id": model.cfg.media_token_id})
                spec = decoder_spec(dims, io_dtype, form)
            graphs[name] = GraphEntry(path.name, "fp32", options.opset, spec, external, form)
            size = sum((tmp / f).stat().st_size for f in (path.name, *external))
            say(f"{name} graph: {size / 2**20:.1f} MiB in {time.perf_counter() - start:.1f} s")

    say("saving tokenizer...")
    return write_manifest(
        tmp, model.cfg, tokenizer, graphs, options,
        preprocess=model.preprocess, prompt=model.prompt_format,
    )  # fmt: skip


def write_manifest(
    tmp: Path,
    cfg: FlamingoConfig,
    tokenizer: Any,
    graphs: dict[str, GraphEntry],
    options: ExportOptions,
    quantization: dict[str, Any] | None = None,
    *,
    preprocess: dict[str, Any] | None = None,
    prompt: dict[str, Any] | None = None,
) -> Manifest:
    """Save the tokenizer into tmp/tokenizer and write the manifest of the graphs in tmp
    (export, and the streaming export of precision.streaming). `preprocess` and `prompt`:
    what the model's loader set (IDEFICS), else open_clip's preprocessing at the vision size."""
    tok_dir = tmp / "tokenizer"
    tokenizer.save_pretrained(str(tok_dir))
    if not (tok_dir / "tokenizer.json").is_file():
        raise ExportError(
            "the tokenizer has no fast (tokenizer.json) form; the torch-free runtime needs one"
        )
    tok_files = sorted(str(p.relative_to(tmp)) for p in tok_dir.rglob("*") if p.is_file())
    special = {
        "media_token": "<image>",
        "eoc_token": tokenizer.convert_ids_to_tokens(cfg.eoc_token_id),
        "media_token_id": cfg.media_token_id,
        "eoc_token_id": cfg.eoc_token_id,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    # a loader that knows better (IDEFICS) gives the model's preprocessing and prompt format
    preprocess_config = PreprocessConfig.from_dict(
        preprocess or {"image_size": cfg.vision.image_size}
    )
    manifest = Manifest(
        prompt=prompt,
        model=cfg.to_dict(),
        special_tokens=special,
        preprocess=preprocess_config.to_dict(),
        graphs=graphs,
        limits={
            "max_images": options.max_images,
            "max_seq_len": options.max_seq_len,
            "max_frames": options.max_frames,
        },
        tokenizer_files=tok_files,
        tools=tool_versions(),
        quantization=quantization or {},
    )
    manifest.record_files(tmp)
    manifest.write(tmp)
    return manifest
