"""The export manifest: the one contract between exporter, runtime and tests (numpy-free JSON).

An export folder holds `manifest.json`, the ONNX graphs (+ external data), the tokenizer files.
The manifest records the model config, special token ids, preprocessing constants, every graph's
I/O spec, precision, opset, tool versions and the sha256 of every file; `load_manifest` checks
all of it and names what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FlamingoExportError
from .spec import GraphSpec

SCHEMA_VERSION = 3
# what each version changed in the contract (named when an older export is refused)
SCHEMA_CHANGES = {
    2: "decoder input logits_index",
    3: "vision input pixel_values with a frames axis (video clips) and limits.max_frames",
}
MANIFEST_NAME = "manifest.json"
GRAPH_NAMES = ("vision", "decoder")
LIMITS = ("max_images", "max_seq_len", "max_frames")  # what the runtime checks requests against
PRECISIONS = ("fp32", "fp16", "int8", "int4")  # a graph's weights/activations, in the ONNX file


class ManifestError(FlamingoExportError, ValueError):
    """The export folder does not match its manifest (or the manifest is invalid)."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_join(root: Path, relative: str) -> Path:
    """root / relative, refusing absolute paths and paths that escape root (e.g. `../x`)."""
    if os.path.isabs(relative) or relative.startswith(("/", "\\")):
        raise ManifestError(f"{root}: path {relative!r} in the manifest is absolute")
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ManifestError(f"{root}: path {relative!r} in the manifest escapes the export folder")
    return resolved


@dataclass
class GraphEntry:
    file: str
    precision: str  # one of PRECISIONS
    opset: int
    spec: GraphSpec
    external_data: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "precision": self.precision,
            "opset": self.opset,
            "external_data": self.external_data,
            "io": self.spec.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphEntry:
        return cls(
            d["file"], d["precision"], d["opset"], GraphSpec.from_dict(d["io"]), d["external_data"]
        )


@dataclass
class Manifest:
    model: dict[str, Any]  # FlamingoConfig.to_dict()
    special_tokens: dict[str, Any]
    preprocess: dict[str, Any]  # runtime.images.PreprocessConfig.to_dict()
    graphs: dict[str, GraphEntry]
    limits: dict[str, int]  # max_images, max_seq_len, max_frames
    tokenizer_files: list[str]
    tools: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    # quantized exports: per-graph method/settings/backends, calibration, source export
    quantization: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        extra = {"quantization": self.quantization} if self.quantization else {}
        return {
            "schema_version": self.schema_version,
            "model": self.model,
            "special_tokens": self.special_tokens,
            "preprocess": self.preprocess,
            "graphs": {k: g.to_dict() for k, g in self.graphs.items()},
            "limits": self.limits,
            "tokenizer_files": self.tokenizer_files,
            "tools": self.tools,
            "files": self.files,
            **extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> Manifest:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            since = [
                f"{v}: {change}"
                for v, change in SCHEMA_CHANGES.items()
                if isinstance(version, int) and not isinstance(version, bool) and version < v
            ]
            raise ManifestError(
                f"{where}: schema_version {version!r} is not supported by this runtime "
                f"(expected {SCHEMA_VERSION}); re-export with a matching flamingo-export"
                + (f" (changed since: {'; '.join(since)})" if since else "")
            )
        try:
            graphs = {k: GraphEntry.from_dict(g) for k, g in d["graphs"].items()}
            missing = [g for g in GRAPH_NAMES if g not in graphs]
            if missing:
                raise ManifestError(f"{where}: graphs {missing} missing")
            missing = [k for k in LIMITS if k not in d["limits"]]
            if missing:
                raise ManifestError(f"{where}: limits {missing} missing")
            return cls(
                model=d["model"],
                special_tokens=d["special_tokens"],
                preprocess=d["preprocess"],
                graphs=graphs,
                limits=d["limits"],
                tokenizer_files=d["tokenizer_files"],
                tools=d.get("tools", {}),
                files=d["files"],
                quantization=d.get("quantization", {}),
            )
        except (KeyError, TypeError) as e:
            raise ManifestError(f"{where}: invalid manifest ({type(e).__name__}: {e})") from e

    def record_files(self, root: Path) -> None:
        """Hash every file the export consists of (graphs, external data, tokenizer)."""
        names = [g.file for g in self.graphs.values()]
        names += [x for g in self.graphs.values() for x in g.external_data]
        names += self.tokenizer_files
        self.files = {n: sha256_file(safe_join(root, n)) for n in sorted(set(names))}

    def write(self, root: Path) -> Path:
        path = root / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def load_manifest(root: str | Path, verify_hashes: bool = True) -> Manifest:
    """Read and check an export folder's manifest: schema, files present, sha256 of each."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{root}: not an export folder ({MANIFEST_NAME} not found)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: invalid JSON ({e})") from e
    manifest = Manifest.from_dict(data, str(path))
    for graph in manifest.graphs.values():
        for name in (graph.file, *graph.external_data):
            if name not in manifest.files:
                raise ManifestError(f"{path}: file {name!r} is used but has no sha256 entry")
    files = {name: safe_join(root, name) for name in manifest.files}  # all paths first
    for name, file in files.items():
        if not file.is_file():
            raise ManifestError(f"{root}: file {name!r} listed in the manifest is missing")
    for name, digest in manifest.files.items():
        if verify_hashes and sha256_file(files[name]) != digest:
            raise ManifestError(
                f"{root}: file {name!r} does not match its sha256 in the manifest "
                "(modified or truncated after export)"
            )
    return manifest
