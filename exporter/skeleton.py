"""The fp32 graphs' structure without their weights: what `export` writes, minus the data.

`trace_skeleton` runs the export's own torch.onnx call (`exporter.export.torch_onnx_export`) on
a model whose large parameters are uninitialised memory that is never written (so never
resident), with `export_params=False`. Small parameters (norms, biases, gates, at most
`small_bytes` each) hold their real values. torch's constant folding turns some weights into
new initializers (transposed Linear weights for MatMul, the q/k/v row blocks of a fused
projection); these are views of the parameter's storage, so each initializer of the graph is
recorded as a `ParamView` (parameter name + `as_strided` geometry) that the streaming export
evaluates on the real parameter, one at a time. The result is the fp32 export's graph proto,
node for node and name for name, with each large initializer a placeholder without data.

torch keeps the folded weights in a dict it does not return; `_folded_weights` reads it at the
last pass of `_model_to_graph` (a scoped wrapper around `torch._C.
_jit_pass_filter_non_tensor_arguments`, restored on exit). It also gives every view of a
placeholder a distinct first element there, so torch's value-deduplication of initializers
(identical tensors stored once, an Identity node for the copy) never merges placeholders by
their meaningless contents; real duplicates among large tensors are found by `fingerprint` and
traced again with their values (`real`), so torch deduplicates them as the fp32 export does.
"""

from __future__ import annotations

import contextlib
import mmap
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from flamingo.config import FlamingoConfig
from flamingo.model import Flamingo
from runtime.spec import ModelDims

from .export import ExportError, example_inputs, graph_modules, torch_onnx_export, trace_sizes

# a numbered block of a module list (`lang_model.layers.12`): the unit of progress
LAYER_GROUP = re.compile(r"^(.*?\.(?:layers|resblocks|blocks|cross_attn_layers)\.\d+)(?:\.|$)")
# whose blocks each graph runs as modules (the vision graph uses only the cross-attention
# layers' K/V projections, not their forward)
_TRACED_BLOCKS: dict[str, Callable[[Flamingo], nn.Module]] = {
    "vision": lambda model: model.vision_encoder,
    "decoder": lambda model: model.lang_model,
}
SMALL_PARAM_BYTES = 1 << 20  # parameters up to this size are traced with their values
PLACEHOLDER_LOCATION = "<streamed>"  # external-data location of an initializer without data
# A folded weight that is no view of a placeholder is read from the trace as is: fine for
# config constants (ALiBi slopes, rotary frequencies); anything larger is no constant.
_MAX_TRACED_CONSTANT_BYTES = 64 << 20


@dataclass(frozen=True)
class ParamView:
    """An initializer whose values are `torch.as_strided(param, size, stride, offset)` of one
    model parameter (as contiguous fp32, the layout the export's parameters have)."""

    param: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.size:
            n *= d
        return n


@dataclass
class Skeleton:
    """One fp32 graph: its proto (large initializers are placeholders) and where each
    placeholder's values come from."""

    name: str
    model: onnx.ModelProto
    views: dict[str, ParamView]
    # (dtype, size, stride) -> fingerprints of the traced (real-valued) initializers
    traced_fingerprints: dict[str, tuple] = field(default_factory=dict)


def placeholder(name: str, dims: tuple[int, ...], data_type: int) -> TensorProto:
    """An initializer with dims and dtype but no data (external data at a location that is no
    file, so reading it fails loudly)."""
    tensor = TensorProto(name=name, dims=list(dims), data_type=data_type)
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", PLACEHOLDER_LOCATION
    return tensor


def is_placeholder(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == PLACEHOLDER_LOCATION for e in tensor.external_data
    )


def fingerprint_key(tensor: torch.Tensor | ParamView, dtype: str = "float32") -> str:
    """What torch's deduplication compares before values: dtype, sizes and strides."""
    if isinstance(tensor, ParamView):
        return f"{dtype}{tensor.size}{tensor.stride}"
    return f"{str(tensor.dtype).removeprefix('torch.')}{tuple(tensor.shape)}{tensor.stride()}"


def fingerprint(values: torch.Tensor) -> tuple[float, ...] | None:
    """Counts of +inf and -inf, sums of the finite values and of their squares (float64, in
    chunks: no full-size copy): equal tensors have equal fingerprints. None when a NaN makes
    the tensor equal to nothing (torch.equal semantics)."""
    flat = values.reshape(-1)
    out = [0.0, 0.0, 0.0, 0.0]
    step = 1 << 22
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step].double()
        if torch.isnan(chunk).any():
            return None
        finite = torch.isfinite(chunk)
        if not finite.all():
            out[0] += float((chunk == float("inf")).sum())
            out[1] += float((chunk == float("-inf")).sum())
            chunk = chunk[finite]
        out[2] += float(chunk.sum())
        out[3] += float(chunk.dot(chunk))
    return tuple(out)


def untouched(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor in a fresh private anonymous mapping: reading it maps the kernel's zero page,
    so until written it takes no memory (torch.empty may reuse dirty heap memory)."""
    numel = 1
    for d in shape:
        numel *= d
    nbytes = max(1, numel * torch.empty((), dtype=dtype).element_size())
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buffer, dtype=dtype, count=numel).view(shape)


def build_model(
    cfg: FlamingoConfig,
    tensors: dict[str, torch.Tensor],
    materialize: Callable[[torch.Tensor], torch.Tensor],
    small_bytes: int = SMALL_PARAM_BYTES,
    real: frozenset[str] = frozenset(),
) -> Flamingo:
    """The export's fp32 model (as loaders.load_flamingo builds it: contiguous parameters, tied
    head, config buffers) with real values only in small parameters and those in `real`; the
    others are `untouched` memory."""
    with torch.device("meta"):
        model = Flamingo(cfg)
    for name, param in list(model.named_parameters()):
        nbytes = param.numel() * 4
        if nbytes <= small_bytes or name in real:
            value = materialize(tensors[name]).to(torch.float32).contiguous()
        else:
            value = untouched(tuple(param.shape))
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    if cfg.lm.tie_word_embeddings:
        model.lang_model.lm_head.weight = model.lang_model.embed_tokens.weight
    model.lang_model._init_buffers()
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise ExportError(f"cannot build the traced model: {meta[:3]} have no values")
    return model.eval()


@contextlib.contextmanager
def _shape_inference_without(placeholders: set[int], say: Callable[[str], None]) -> Iterator[None]:
    """torch's graph-level ONNX shape inference without the placeholders' values.

    For every node, `_jit_pass_onnx_graph_shape_type_inference` copies each parameter input
    into a one-node ONNX model as a Constant and runs onnx's shape inference on it: every
    weight is serialized once per use, twice per export (before and after constant folding),
    and that was most of the decoder trace's time. Left out of the dict it gets, a weight is
    an input of that one-node model with the same dtype and shape, which is all shape inference
    reads of a weight (tests/precision/test_streaming.py compares the graphs with the fp32
    export's, byte for byte)."""
    original = torch._C._jit_pass_onnx_graph_shape_type_inference
    passes = [0]

    def infer(graph: torch._C.Graph, params: dict[str, torch.Tensor], opset: int) -> None:
        passes[0] += 1
        say(f"ONNX shape inference, pass {passes[0]} (before and after constant folding)...")
        kept = {
            name: tensor
            for name, tensor in params.items()
            if not (tensor.numel() and tensor.untyped_storage().data_ptr() in placeholders)
        }
        return original(graph, kept, opset)

    torch._C._jit_pass_onnx_graph_shape_type_inference = infer
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = original


@contextlib.contextmanager
def _block_progress(
    model: nn.Module, module: nn.Module, say: Callable[[str], None]
) -> Iterator[None]:
    """One message per numbered block (`LAYER_GROUP`) of `module` (the vision encoder's or the
    LM's) as the trace runs it."""
    names = {id(m): n for n, m in model.named_modules()}

    def is_block(name: str, block: nn.Module) -> bool:
        group = LAYER_GROUP.match(name)
        return group is not None and group[1] == name and not isinstance(block, nn.ModuleList)

    blocks = [m for m in module.modules() if is_block(names.get(id(m), ""), m)]
    seen: set[int] = set()
    start = time.perf_counter()

    def hook(block: nn.Module, *_: object) -> None:
        if id(block) in seen:
            return
        seen.add(id(block))
        say(f"traced {names[id(block)]} ({len(seen)}/{len(blocks)} blocks, "
            f"{time.perf_counter() - start:.0f} s)")  # fmt: skip

    handles = [b.register_forward_hook(hook) for b in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _folded_weights(placeholders: set[int]) -> Iterator[list[dict[str, torch.Tensor]]]:
    """The named weights torch.onnx exports (after constant folding), captured at the last pass
    of `_model_to_graph`; views of placeholder storages get distinct first elements there."""
    box: list[dict[str, torch.Tensor]] = []
    original = torch._C._jit_pass_filter_non_tensor_arguments

    def capture(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        params = original(params)
        with torch.no_grad():
            for i, tensor in enumerate(params.values()):
                if tensor.numel() and tensor.untyped_storage().data_ptr() in placeholders:
                    tensor[(0,) * tensor.dim()] = 1e30 + i * 1e25  # no real weight is this
        box.append(params)
        return params

    torch._C._jit_pass_filter_non_tensor_arguments = capture
    try:
        yield box
    finally:
        torch._C._jit_pass_filter_non_tensor_arguments = original


def trace_skeletons(model: Flamingo, opset: int, small_bytes: int = SMALL_PARAM_BYTES,
                    real: frozenset[str] = frozenset(),
                    only: tuple[str, ...] = ("vision", "decoder"),
                    progress: Callable[[str], None] | None = None) -> list[Skeleton]:  # fmt: skip
    """The vision and decoder graphs of `export` (same torch.onnx call, same tracing inputs)
    with large initializers as placeholders. `progress` gets a line per traced block (layer)
    and per torch.onnx stage."""
    placeholders = {
        p.untyped_storage().data_ptr(): name
        for name, p in model.named_parameters()
        if p.numel() * p.element_size() > small_bytes and name not in real
    }
    dims = ModelDims.from_config(model.cfg.to_dict())
    sizes = trace_sizes(dims)
    out = []
    with tempfile.TemporaryDirectory(prefix="flamingo-skeleton-") as work:
        for name, spec, module in graph_modules(model, "float32"):
            if name not in only:
                continue
            path = Path(work) / f"{name}.onnx"
            start = time.perf_counter()

            def say(message: str, name: str = name) -> None:
                if progress is not None:
                    progress(f"{name} graph: {message}")

            with (
                torch.no_grad(),
                _block_progress(model, _TRACED_BLOCKS[name](model), say),
                _shape_inference_without(set(placeholders), say),
                _folded_weights(set(placeholders)) as box,
            ):
                torch_onnx_export(
                    module, example_inputs(spec, sizes, torch.float32), spec, path, opset,
                    export_params=False,
                )  # fmt: skip
            say(f"structure traced in {time.perf_counter() - start:.0f} s")
            if len(box) != 1:
                raise ExportError(
                    f"cannot trace the {name} graph without its weights with torch "
                    f"{torch.__version__} (its ONNX exporter changed); export at fp32 and "
                    "quantize instead"
                )
            out.append(_to_skeleton(name, onnx.load(str(path)), spec.input_names, box[0],
                                    placeholders))  # fmt: skip
    return out


def _to_skeleton(
    name: str,
    proto: onnx.ModelProto,
    input_names: list[str],
    params: dict[str, torch.Tensor],
    placeholders: dict[int, str],
) -> Skeleton:
    """export_params=False lists the weights as graph inputs: make them initializers, in the
    order the export writes them."""
    graph = proto.graph
    weights = [v for v in graph.input if v.name not in input_names]
    missing = [v.name for v in weights if v.name not in params]
    if missing:
        raise ExportError(f"{name} graph: traced weights {missing[:3]} have no values")
    skeleton = Skeleton(name, proto, {})
    for value in weights:
        tensor = params[value.name]
        param = placeholders.get(tensor.untyped_storage().data_ptr())
        if param is not None:
            if tensor.dtype != torch.float32:
                raise ExportError(f"{name} graph: weight {value.name} is {tensor.dtype}")
            view = ParamView(param, tuple(tensor.shape), tuple(tensor.stride()),
                             tensor.storage_offset())  # fmt: skip
            skeleton.views[value.name] = view
            graph.initializer.append(placeholder(value.name, view.size, TensorProto.FLOAT))
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > _MAX_TRACED_CONSTANT_BYTES:
            raise ExportError(
                f"{name} graph: torch computed weight {value.name} ({nbytes} bytes) from "
                "other weights; the streaming export reads weights only as views of the "
                "checkpoint's tensors: export at fp32 and quantize instead"
            )
        values = tensor.detach().contiguous()
        skeleton.traced_fingerprints[value.name] = (fingerprint_key(tensor), fingerprint(values))
        graph.initializer.append(numpy_helper.from_array(values.numpy(), value.name))
    kept = [v for v in graph.input if v.name in input_names]
    del graph.input[:]
    graph.input.extend(kept)
    return skeleton
