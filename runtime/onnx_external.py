"""The external-data references inside an ONNX file, read from the protobuf wire format.

onnxruntime opens whatever file a tensor's `external_data` `location` names (relative to the
model's folder) when it loads a graph. `runtime.manifest.load_manifest` must know those paths
before onnxruntime does, whatever the installed onnxruntime or onnx version checks, and the
base install has no `onnx`: this walks just enough of the protobuf (onnx/onnx.proto3) to find
every TensorProto and returns its external-data entries. Payload fields (`raw_data` and
friends) are skipped by length, never copied, so a 2 GB graph is walked without reading its
weights into Python objects.

Walked: ModelProto.graph (7), .training_info (20: initialization 1, algorithm 2), .functions
(25); GraphProto.node (1), .initializer (5), .sparse_initializer (15); NodeProto.attribute (5);
AttributeProto.t (5), .g (6), .tensors (10), .graphs (11), .sparse_tensor (22),
.sparse_tensors (23); FunctionProto.node (7), .attribute_proto (11); SparseTensorProto.values
(1), .indices (2); TensorProto.name (8), .external_data (13: StringStringEntryProto key 1,
value 2), .data_location (14).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

from .errors import FlamingoExportError


class OnnxFormatError(FlamingoExportError, ValueError):
    """The file is not a well-formed ONNX protobuf."""


@dataclass(frozen=True)
class ExternalTensor:
    """One tensor whose bytes live in another file: where (as written in the graph)."""

    tensor: str
    location: str
    offset: str | None
    length: str | None


# (message, field number) -> message type of that length-delimited field
_MODEL, _GRAPH, _NODE, _ATTR, _TENSOR, _SPARSE, _FUNCTION, _TRAINING, _ENTRY = range(9)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _FUNCTION: {7: _NODE, 11: _ATTR},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
}
_MAX_DEPTH = 64  # nested subgraphs (If/Loop bodies); deeper is refused, not recursed into


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise OnnxFormatError("truncated or malformed varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited payload)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise OnnxFormatError("truncated fixed-width field")
            pos += size
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise OnnxFormatError(f"field {number} runs past the end (truncated?)")
            yield number, wire, (pos, pos + size)
            pos += size
        else:
            raise OnnxFormatError(f"unsupported wire type {wire} (field {number})")


def _text(buf: memoryview, span: tuple[int, int]) -> str:
    try:
        return bytes(buf[span[0] : span[1]]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise OnnxFormatError(f"a string field is not UTF-8 ({e})") from e


def _tensor(buf: memoryview, start: int, end: int) -> ExternalTensor | None:
    name, entries, external = "", {}, False
    for number, wire, value in _fields(buf, start, end):
        if number == 8 and wire == 2:
            name = _text(buf, value)
        elif number == 14 and wire == 0:
            external = value == 1
        elif number == 13 and wire == 2:
            key = val = ""
            for n, w, v in _fields(buf, *value):
                if w == 2 and n in (1, 2):
                    key, val = (_text(buf, v), val) if n == 1 else (key, _text(buf, v))
            entries[key] = val
    if not external and not entries:
        return None
    return ExternalTensor(
        name, entries.get("location", ""), entries.get("offset"), entries.get("length")
    )


def _walk(buf: memoryview, kind: int, start: int, end: int, depth: int, out: list) -> None:
    if depth > _MAX_DEPTH:
        raise OnnxFormatError(f"subgraphs nested deeper than {_MAX_DEPTH}")
    children = _CHILDREN[kind]
    for number, wire, value in _fields(buf, start, end):
        child = children.get(number)
        if child is None or wire != 2:
            continue
        if child == _TENSOR:
            found = _tensor(buf, *value)
            if found is not None:
                out.append(found)
        else:
            _walk(buf, child, *value, depth + 1, out)


def external_tensors(path: str | Path) -> list[ExternalTensor]:
    """Every tensor of the ONNX file at `path` that names external data (in file order).

    Raises OnnxFormatError for a file that is not a parsable protobuf (empty, truncated).
    """
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise OnnxFormatError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            buf = memoryview(mapped)
            try:
                out: list[ExternalTensor] = []
                _walk(buf, _MODEL, 0, size, 0, out)
                return out
            finally:
                buf.release()
