"""Decoder graph forms derived from the portable decoder by ONNX rewrites (one model code path).

The exporter writes one decoder graph, the portable form that TensorRT parses (attention from
MatMul/Softmax/Concat, `present = Concat(past, new)`, media and logits indices as inputs;
runtime.spec). The forms here are rewrites of that graph, so they compute the same function
and differ only in how the work is laid out:

* `kv_cache="inplace"` (onnxruntime only): each layer's `Concat(past, new)` and attention
  (repeat-KV, MatMul, scale, bias Add, Softmax, MatMul) become one com.microsoft
  GroupQueryAttention node whose `past_key_values.{i}.*` and `present.{i}.*` may be the same
  preallocated (batch, kv_heads, capacity, head_dim) buffer: onnxruntime then writes the new
  positions in place instead of copying the whole cache every step. The graph's own additive
  bias (causal, padding, ALiBi) is passed as `attention_bias`, so left padding and MPT work as
  in the portable graph; seqlens_k / total_sequence_length come from `attention_mask`'s shape.
  Marked `backends: ["onnxruntime"]` in the manifest.
* `indices="in-graph"`: `media_index` and `logits_index` are computed inside the graph
  (runtime.decoding.in_graph_media_index states the rule; a test checks the graph against
  it) instead of being inputs, so a generation loop that binds per-request inputs once
  (onnxruntime-genai) can drive the decoder. OpenFlamingo's media rule for a prompt prefilled
  whole (or a prefix and the rest), one row or rows with equal image counts; not IDEFICS's
  image mask (the processor's per-token one-hot, which no count of `<image>` tokens
  reproduces after an EOS). Portable ops only (opset 17). Logits of every new position
  (onnxruntime-genai binds a (batch, new, vocab) logits buffer and picks the last itself), so
  a prefill pays the LM head for every prompt token, which the portable form skips.

Raises DecoderFormError where the graph is not the portable pattern (e.g. W8A8 quantized
attention MatMuls): the rewrite never guesses.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from runtime.manifest import Manifest, load_manifest, safe_join
from runtime.spec import (
    KV_CAPACITY,
    DecoderForm,
    DecoderFormError,
    ModelDims,
    cross_attn_names,
    decoder_spec,
    past_names,
    present_names,
)

from .output import check_output, write_atomically

MS_DOMAIN = "com.microsoft"
# ops between present.{i}.key|value and the attention MatMuls (repeat_kv, K transpose)
_KV_CHAIN_OPS = ("Unsqueeze", "Mul", "Reshape", "Transpose")


class _Graph:
    """Producer/consumer maps over a GraphProto's nodes (rebuilt after each layer)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.refresh()

    def refresh(self) -> None:
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def only_consumer(self, name: str, where: str) -> onnx.NodeProto:
        users = self.consumers.get(name, [])
        if len(users) != 1:
            raise DecoderFormError(f"{where}: {name!r} has {len(users)} consumers, expected 1")
        return users[0]

    def constant(self, name: str) -> np.ndarray | None:
        for t in self.graph.initializer:
            if t.name == name:
                return numpy_helper.to_array(t)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None


def _follow(g: _Graph, name: str, where: str) -> tuple[list[onnx.NodeProto], onnx.NodeProto]:
    """From a present tensor through repeat-KV / transpose nodes to the attention MatMul."""
    chain: list[onnx.NodeProto] = []
    node = g.only_consumer(name, where)
    while node.op_type in _KV_CHAIN_OPS:
        chain.append(node)
        node = g.only_consumer(node.output[0], where)
    if node.op_type != "MatMul":
        raise DecoderFormError(
            f"{where}: the cache feeds {node.op_type} ({node.name}), not the attention MatMul "
            "(is the attention quantized? the in-place form needs the portable attention)"
        )
    return chain, node


def _skip_casts(g: _Graph, node: onnx.NodeProto, where: str) -> tuple[list, onnx.NodeProto]:
    casts = []
    while node.op_type == "Cast":
        casts.append(node)
        node = g.only_consumer(node.output[0], where)
    return casts, node


def _rewrite_layer(g: _Graph, layer: int, dims: dict, shared: dict[str, str]) -> None:
    """Replace layer `layer`'s Concat + attention by one GroupQueryAttention node."""
    where = f"decoder layer {layer}"
    past_k, past_v = past_names(layer)
    present_k, present_v = present_names(layer)
    concat_k, concat_v = g.producer.get(present_k), g.producer.get(present_v)
    for node, past in ((concat_k, past_k), (concat_v, past_v)):
        if node is None or node.op_type != "Concat" or list(node.input)[:1] != [past]:
            raise DecoderFormError(f"{where}: present is not Concat({past}, new)")
    k_chain, scores_mm = _follow(g, present_k, where)
    v_chain, out_mm = _follow(g, present_v, where)
    if scores_mm.input[1] != (k_chain[-1].output[0] if k_chain else present_k):
        raise DecoderFormError(f"{where}: the keys are not the scores MatMul's second input")
    query = scores_mm.input[0]
    removed = [concat_k, concat_v, *k_chain, *v_chain, scores_mm]
    node = g.only_consumer(scores_mm.output[0], where)
    scale = 1.0
    if node.op_type == "Mul":
        value = g.constant(node.input[1])
        if value is None or value.size != 1:
            raise DecoderFormError(f"{where}: the scores are scaled by a non-constant")
        scale = float(value.reshape(()))
        removed.append(node)
        node = g.only_consumer(node.output[0], where)
    bias = ""
    if node.op_type == "Add":
        bias = node.input[1] if node.input[0] == removed[-1].output[0] else node.input[0]
        removed.append(node)
        node = g.only_consumer(node.output[0], where)
    casts, softmax = _skip_casts(g, node, where)
    if softmax.op_type != "Softmax":
        raise DecoderFormError(f"{where}: expected Softmax after the scores, got {softmax.op_type}")
    casts2, mm = _skip_casts(g, g.only_consumer(softmax.output[0], where), where)
    if mm is not out_mm:
        raise DecoderFormError(f"{where}: the probabilities do not meet the values' MatMul")
    removed += [*casts, softmax, *casts2, out_mm]
    # merge_heads after the output MatMul: Transpose(0, 2, 1, 3) -> Reshape(0, 0, -1)
    merge_t = g.only_consumer(out_mm.output[0], where)
    merge_r = g.only_consumer(merge_t.output[0], where) if merge_t.op_type == "Transpose" else None
    perm = [list(a.ints) for a in merge_t.attribute if a.name == "perm"]
    if merge_r is None or merge_r.op_type != "Reshape" or perm != [[0, 2, 1, 3]]:
        raise DecoderFormError(f"{where}: the attention output is not merged by Transpose+Reshape")
    removed += [merge_t, merge_r]
    prefix = f"/inplace/layers.{layer}"
    new_nodes = []

    def to_bsd(name: str, tag: str) -> str:  # (B, N, T, Dh) -> (B, T, N * Dh)
        t = f"{prefix}/{tag}_bsnh"
        new_nodes.append(helper.make_node("Transpose", [name], [t], f"{t}_T", perm=[0, 2, 1, 3]))
        out = f"{prefix}/{tag}_bsd"
        new_nodes.append(helper.make_node("Reshape", [t, shared["bsd_shape"]], [out], out))
        return out

    q = to_bsd(query, "query")
    k = to_bsd(concat_k.input[1], "key")
    v = to_bsd(concat_v.input[1], "value")
    inputs = [q, k, v, past_k, past_v, shared["seqlens_k"], shared["total"], "", "", "", bias]
    inputs += ["", "", "", "", "", shared["query_seqlens"]]
    new_nodes.append(
        helper.make_node(
            "GroupQueryAttention",
            inputs,
            [merge_r.output[0], present_k, present_v],
            f"{prefix}/GroupQueryAttention",
            domain=MS_DOMAIN,
            num_heads=dims["num_heads"],
            kv_num_heads=dims["num_kv_heads"],
            scale=scale,
        )
    )
    position = min(list(g.graph.node).index(n) for n in removed)
    gone = {id(n) for n in removed}
    kept = [n for n in g.graph.node if id(n) not in gone]
    before = sum(1 for n in list(g.graph.node)[:position] if id(n) not in gone)
    del g.graph.node[:]
    g.graph.node.extend(kept[:before] + new_nodes + kept[before:])
    g.refresh()


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing reads (the rewrites leave constants behind)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _const(name: str, value: Iterable[int] | int, dtype: type = np.int64) -> onnx.NodeProto:
    array = np.array(value, dtype=dtype)
    return helper.make_node(
        "Constant", [], [name], name, value=numpy_helper.from_array(array, name)
    )


def _set_dim(value: onnx.ValueInfoProto, axis: int, param: str) -> None:
    dim = value.type.tensor_type.shape.dim[axis]
    dim.ClearField("dim_value")
    dim.dim_param = param


def to_inplace_kv(model: onnx.ModelProto, num_layers: int, num_heads: int, kv_heads: int) -> None:
    """Rewrite the portable decoder (in place) into the shared-buffer GroupQueryAttention form.

    Past/present keep their names; their sequence axis becomes `kv_capacity` (the buffer's
    length when past and present are bound to one buffer, else past / past + new)."""
    graph = model.graph
    names = {i.name for i in graph.input}
    if "past_key_values.0.key" not in names:
        raise DecoderFormError("the graph has no past_key_values inputs: not a decoder")
    if any(n.op_type == "GroupQueryAttention" for n in graph.node):
        raise DecoderFormError("the decoder is already in the in-place form")
    p = "/inplace"
    shared = {
        "bsd_shape": f"{p}/bsd_shape",
        "seqlens_k": f"{p}/seqlens_k",
        "total": f"{p}/total_sequence_length",
        "query_seqlens": f"{p}/query_seqlens",
    }
    setup = [
        _const(shared["bsd_shape"], [0, 0, -1]),
        helper.make_node("Shape", ["attention_mask"], [f"{p}/total_1d"], start=1, end=2),
        helper.make_node("Shape", ["attention_mask"], [f"{p}/batch_1d"], start=0, end=1),
        helper.make_node("Cast", [f"{p}/total_1d"], [f"{p}/total_1d_i32"], to=6),
        _const(f"{p}/zero_axis", [0]),
        helper.make_node(
            "Squeeze", [f"{p}/total_1d_i32", f"{p}/zero_axis"], [shared["total"]], f"{p}/total"
        ),
        _const(f"{p}/one_i32", [1], np.int32),
        helper.make_node("Sub", [f"{p}/total_1d_i32", f"{p}/one_i32"], [f"{p}/last_1d"]),
        helper.make_node("Expand", [f"{p}/last_1d", f"{p}/batch_1d"], [shared["seqlens_k"]]),
        # every row's new tokens are all valid (left padding lives in the bias): P = T - new
        helper.make_node("Shape", ["input_ids"], [f"{p}/new_1d"], start=1, end=2),
        helper.make_node("Cast", [f"{p}/new_1d"], [f"{p}/new_1d_i32"], to=6),
        helper.make_node("Expand", [f"{p}/new_1d_i32", f"{p}/batch_1d"], [shared["query_seqlens"]]),
    ]
    for node in setup:
        if not node.name:
            node.name = node.output[0]
    g = _Graph(graph)
    dims = {"num_heads": num_heads, "num_kv_heads": kv_heads}
    for layer in range(num_layers):
        _rewrite_layer(g, layer, dims, shared)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(setup + nodes)
    _prune(graph)
    for value in (*graph.input, *graph.output):
        if value.name.startswith(("past_key_values.", "present.")):
            _set_dim(value, 2, KV_CAPACITY)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def with_in_graph_indices(
    model: onnx.ModelProto, media_token_id: int, num_latents: int, first_xattn_layer: int
) -> None:
    """Replace the `media_index` and `logits_index` inputs (in place) by in-graph computation:
    media_index = clip(before + cumsum(ids == <image>), 0, images), where images = media_keys /
    num_latents of the cross-attention K/V fed and before = 0 for a prefill from an empty
    cache, images - (<image> tokens in this chunk) after one; logits_index = [0, T)."""
    graph = model.graph
    names = [i.name for i in graph.input]
    if "media_index" not in names or "logits_index" not in names:
        raise DecoderFormError("the decoder computes its indices in the graph already")
    kept = [i for i in graph.input if i.name not in ("media_index", "logits_index")]
    del graph.input[:]
    graph.input.extend(kept)
    key = cross_attn_names(first_xattn_layer)[0]
    p = "/in_graph_indices"
    nodes = [
        _const(f"{p}/media_token", media_token_id),
        _const(f"{p}/latents", [num_latents]),
        _const(f"{p}/zero", [0]),
        _const(f"{p}/seq_axis", 1),
        _const(f"{p}/seq_axes", [1]),
        helper.make_node("Shape", ["input_ids"], [f"{p}/new"], start=1, end=2),
        helper.make_node("Shape", ["attention_mask"], [f"{p}/total"], start=1, end=2),
        helper.make_node("Sub", [f"{p}/total", f"{p}/new"], [f"{p}/past"]),
        helper.make_node("Greater", [f"{p}/past", f"{p}/zero"], [f"{p}/has_past_b"]),
        helper.make_node("Cast", [f"{p}/has_past_b"], [f"{p}/has_past"], to=7),
        helper.make_node("Shape", [key], [f"{p}/keys"], start=2, end=3),
        helper.make_node("Div", [f"{p}/keys", f"{p}/latents"], [f"{p}/images"]),
        helper.make_node("Equal", ["input_ids", f"{p}/media_token"], [f"{p}/is_media_b"]),
        helper.make_node("Cast", [f"{p}/is_media_b"], [f"{p}/is_media"], to=7),
        helper.make_node("CumSum", [f"{p}/is_media", f"{p}/seq_axis"], [f"{p}/count"]),
        helper.make_node(
            "ReduceSum", [f"{p}/is_media", f"{p}/seq_axes"], [f"{p}/in_chunk"], keepdims=1
        ),
        helper.make_node("Sub", [f"{p}/images", f"{p}/in_chunk"], [f"{p}/seen"]),
        helper.make_node("Mul", [f"{p}/has_past", f"{p}/seen"], [f"{p}/before"]),
        helper.make_node("Add", [f"{p}/before", f"{p}/count"], [f"{p}/index"]),
        helper.make_node("Min", [f"{p}/index", f"{p}/images"], [f"{p}/capped"]),
        helper.make_node("Max", [f"{p}/capped", f"{p}/zero"], ["media_index"]),
        helper.make_node("Squeeze", [f"{p}/new", f"{p}/zero"], [f"{p}/new_scalar"]),
        _const(f"{p}/start", 0),
        helper.make_node(
            "Range", [f"{p}/start", f"{p}/new_scalar", f"{p}/seq_axis"], ["logits_index"]
        ),
    ]
    for node in nodes:
        if not node.name:
            node.name = f"{p}/{node.op_type}_{node.output[0].rsplit('/', 1)[-1]}"
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)


def apply_form(
    model: onnx.ModelProto, form: DecoderForm, model_config: dict, special_tokens: dict
) -> None:
    """Rewrite a portable decoder (in place) into `form` (a no-op for the portable form)."""
    form.validate()
    lm = model_config["lm"]
    if form.indices == "in-graph":
        dims = ModelDims.from_config(model_config)
        with_in_graph_indices(
            model,
            int(special_tokens["media_token_id"]),
            dims.num_latents,
            dims.xattn_layers[0],
        )
    if form.kv_cache == "inplace":
        to_inplace_kv(model, lm["num_layers"], lm["num_heads"], lm["num_kv_heads"])


def rewrite_graph_file(
    path: Path, form: DecoderForm, model_config: dict, special_tokens: dict
) -> None:
    """Rewrite the decoder file at `path` into `form` (weights stay where they are: external
    data is not loaded, and the rewrite moves no initializer)."""
    model = onnx.load(str(path), load_external_data=False)
    apply_form(model, form, model_config, special_tokens)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=False)


def derive_export(
    src: str | Path, out: str | Path, form: DecoderForm, force: bool = False
) -> Manifest:
    """Write OUT: the export at `src` (portable decoder form) with its decoder rewritten into
    `form`; every other file is copied unchanged and the manifest records the new form and
    hashes. Raises DecoderFormError where `src` is not in the portable form or its decoder is
    not the portable pattern (ManifestError for a bad `src`)."""
    src, out = Path(src), Path(out)
    source = load_manifest(src)
    if not source.graphs["decoder"].form.portable:
        raise DecoderFormError(
            f"{src}: the decoder is in form {source.graphs['decoder'].form.to_dict()}; derive "
            "other forms from a portable export"
        )
    form.validate()
    check_output(out, force)

    def build(tmp: Path) -> Manifest:
        for rel in source.files:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(safe_join(src, rel), dst)
        entry = source.graphs["decoder"]
        rewrite_graph_file(tmp / entry.file, form, source.model, source.special_tokens)
        dims = ModelDims.from_config(source.model)
        dtype = entry.spec.outputs[0].dtype
        graphs = dict(source.graphs)
        graphs["decoder"] = dataclasses.replace(
            entry, spec=decoder_spec(dims, dtype, form), form=form
        )
        manifest = dataclasses.replace(source, graphs=graphs, files={})
        manifest.record_files(tmp)
        manifest.write(tmp)
        return manifest

    return write_atomically(out, force, build)
