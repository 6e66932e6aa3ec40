"""The export manifest: the one contract between exporter, runtime and tests (numpy-free JSON).

An export folder holds `manifest.json`, the ONNX graphs (+ external data), the tokenizer files.
The manifest records the model config, special token ids, preprocessing constants, every graph's
I/O spec, precision, opset, tool versions and the sha256 of every file. Its JSON Schema is
`runtime/manifest.schema.json` (published for serving integrations, and the one definition
`Manifest.from_dict` checks against); `load_manifest` checks the rest: the values agree with
each other, and every file the runtime opens (manifest.json, graphs, the external data each
graph names, tokenizer files) lies inside the folder and is listed with its sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FlamingoExportError
from .files import open_regular
from .onnx_external import OnnxFormatError, external_tensors
from .schema import check_document, load_json
from .spec import PORTABLE, DecoderForm, GraphSpec, ModelDims, decoder_spec, vision_spec

SCHEMA_VERSION = 4
# what each version changed in the contract (named when an older export is refused)
SCHEMA_CHANGES = {
    2: "decoder input logits_index",
    3: "IDEFICS (model fields, prompt)",
    4: "vision input pixel_values with a frames axis (video clips) and limits.max_frames",
}
MANIFEST_NAME = "manifest.json"
SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")
MANIFEST_SCHEMA: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
GRAPH_NAMES = ("vision", "decoder")
PRECISIONS = ("fp32", "fp16", "int8", "int4")  # a graph's weights/activations, in the ONNX file
TOKENIZER_JSON = "tokenizer/tokenizer.json"  # what the runtime's `tokenizers.Tokenizer` reads
# onnxruntime reads external data at this location from process memory, offset = an address
ORT_MEMORY_LOCATION = "*/_ORT_MEM_ADDR_/*"
FLOAT_DTYPES = ("float32", "float16")


class ManifestError(FlamingoExportError, ValueError):
    """The export folder does not match its manifest (or the manifest is invalid)."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_join(root: Path, relative: str, what: str = "path") -> Path:
    """root / relative, refusing absolute paths and paths that escape root (`../x`, or a
    symlink that points outside). `what` names the reference in the error."""
    if os.path.isabs(relative) or relative.startswith(("/", "\\")):
        raise ManifestError(f"{root}: {what} {relative!r} in the manifest is absolute")
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ManifestError(
            f"{root}: {what} {relative!r} in the manifest escapes the export folder"
        )
    return resolved


@dataclass
class GraphEntry:
    file: str
    precision: str  # one of PRECISIONS
    opset: int
    spec: GraphSpec
    external_data: list[str] = field(default_factory=list)
    # the decoder's form (runtime.spec.DecoderForm); written only when not the portable one
    form: DecoderForm = PORTABLE

    @property
    def backends(self) -> tuple[str, ...]:
        """Runtimes that can execute this graph's form (its precision may narrow it further:
        `graph_backends`)."""
        return self.form.backends

    def to_dict(self) -> dict[str, Any]:
        out = {
            "file": self.file,
            "precision": self.precision,
            "opset": self.opset,
            "external_data": self.external_data,
            "io": self.spec.to_dict(),
        }
        if not self.form.portable:
            out["form"] = self.form.to_dict()
            out["backends"] = list(self.backends)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphEntry:
        """From a dict that passed the schema (`Manifest.from_dict` checks it)."""
        return cls(
            d["file"],
            d["precision"],
            d["opset"],
            GraphSpec.from_dict(d["io"]),
            d["external_data"],
            DecoderForm.from_dict(d.get("form")),
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
    # how prompts are built, where not OpenFlamingo's templates (runtime.prompts.PromptFormat)
    prompt: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        extra = {"quantization": self.quantization} if self.quantization else {}
        extra.update({"prompt": self.prompt} if self.prompt else {})
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
    def from_dict(cls, d: Any, where: str = MANIFEST_NAME) -> Manifest:
        """Check `d` against the schema (manifest.schema.json) and `check_consistency`, then
        build; every error is a ManifestError naming `where` (the file) and the key."""
        if not isinstance(d, dict):
            kind = "null" if d is None else type(d).__name__
            raise ManifestError(f"{where}: expected a JSON object, got {kind}")
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
        d = check_document(d, MANIFEST_SCHEMA, where, ManifestError)
        manifest = cls(
            model=d["model"],
            special_tokens=d["special_tokens"],
            preprocess=d["preprocess"],
            graphs={k: GraphEntry.from_dict(g) for k, g in d["graphs"].items()},
            limits=d["limits"],
            tokenizer_files=d["tokenizer_files"],
            tools=d.get("tools", {}),
            files=d["files"],
            quantization=d.get("quantization", {}),
            prompt=d.get("prompt"),
        )
        for name, entry in manifest.graphs.items():
            declared = d["graphs"][name].get("backends")
            if declared is not None and sorted(declared) != sorted(entry.backends):
                raise ManifestError(
                    f"{where}: graphs.{name}.backends {declared} contradicts its form "
                    f"{entry.form.to_dict()} (runs on {list(entry.backends)})"
                )
        manifest.check_consistency(where)
        return manifest

    def check_consistency(self, where: str = MANIFEST_NAME) -> None:
        """What the schema cannot say: special tokens inside the vocabulary and equal to the
        model's, the preprocessing size equal to the vision tower's, each graph's I/O equal
        to the spec its model config implies, every referenced file listed with a sha256."""
        dims = ModelDims.from_config(self.model)
        tokens = self.special_tokens
        for key in ("media_token_id", "eoc_token_id", "pad_token_id", "eos_token_id",
                    "bos_token_id"):  # fmt: skip
            value = tokens.get(key)
            if value is not None and value >= dims.vocab_size:
                raise ManifestError(
                    f"{where}: special_tokens.{key} {value} is outside the vocabulary "
                    f"(model.lm.vocab_size {dims.vocab_size})"
                )
        for key in ("media_token_id", "eoc_token_id", "pad_token_id"):
            if tokens[key] != self.model[key]:
                raise ManifestError(
                    f"{where}: special_tokens.{key} {tokens[key]} differs from model.{key} "
                    f"{self.model[key]}"
                )
        if len({tokens["media_token_id"], tokens["eoc_token_id"]}) != 2:
            raise ManifestError(
                f"{where}: special_tokens.media_token_id and eoc_token_id must differ"
            )
        embedded = self.model["resampler"]["max_num_frames"]
        if embedded is not None and self.limits["max_frames"] > embedded:
            raise ManifestError(
                f"{where}: limits.max_frames {self.limits['max_frames']} exceeds the model's "
                f"frame embeddings (model.resampler.max_num_frames {embedded})"
            )
        if self.preprocess["image_size"] != dims.image_size:
            raise ManifestError(
                f"{where}: preprocess.image_size {self.preprocess['image_size']} differs from "
                f"model.vision.image_size {dims.image_size}"
            )
        decoder = self.graphs["decoder"]
        if self.graphs["vision"].form != PORTABLE:
            raise ManifestError(f"{where}: graphs.vision.form: only the decoder has forms")
        for name, expected in (
            ("vision", vision_spec(dims)),
            ("decoder", decoder_spec(dims, form=decoder.form)),
        ):
            _check_spec(self.graphs[name].spec, expected, f"{where}: graphs.{name}.io")

        for name, entry in self.graphs.items():
            for i, file in enumerate((entry.file, *entry.external_data)):
                key = f"graphs.{name}." + ("file" if i == 0 else f"external_data[{i - 1}]")
                self._require_listed(file, key, where)
        if TOKENIZER_JSON not in self.tokenizer_files:
            raise ManifestError(f"{where}: tokenizer_files does not list {TOKENIZER_JSON!r}")
        for i, file in enumerate(self.tokenizer_files):
            self._require_listed(file, f"tokenizer_files[{i}]", where)

    def _require_listed(self, name: str, key: str, where: str) -> None:
        if name not in self.files:
            raise ManifestError(
                f"{where}: {key} {name!r} is used by the runtime but has no sha256 in `files`"
            )

    def path(self, root: Path, name: str) -> Path:
        """The file `name` of the export at `root`, only if the manifest lists it (sha256)."""
        if name not in self.files:
            raise ManifestError(f"{root}: {name!r} is not listed in {MANIFEST_NAME}")
        return safe_join(Path(root), name)

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


def _check_spec(got: GraphSpec, expected: GraphSpec, where: str) -> None:
    """Names, order and shapes as derived from the model config; integer tensors int64, float
    tensors float32 or float16 (a reduced-precision graph may take and give fp16)."""
    if got.name != expected.name:
        raise ManifestError(f"{where}.name is {got.name!r}, expected {expected.name!r}")
    for kind in ("inputs", "outputs"):
        have, want = getattr(got, kind), getattr(expected, kind)
        names, wanted = [t.name for t in have], [t.name for t in want]
        if names != wanted:
            missing = [n for n in wanted if n not in names]
            extra = [n for n in names if n not in wanted]
            raise ManifestError(
                f"{where}.{kind} do not match the model config (`model`): missing "
                f"{missing[:4]}, unexpected {extra[:4]}"
                + ("" if missing or extra else ", order differs")
            )
        for i, (t, w) in enumerate(zip(have, want)):
            allowed = FLOAT_DTYPES if w.dtype in FLOAT_DTYPES else (w.dtype,)
            if t.dtype not in allowed:
                raise ManifestError(
                    f"{where}.{kind}[{i}] ({t.name}): dtype {t.dtype}, expected one of {allowed}"
                )
            if t.shape != w.shape:
                raise ManifestError(
                    f"{where}.{kind}[{i}] ({t.name}): shape {list(t.shape)}, the model config "
                    f"implies {list(w.shape)}"
                )


def graph_backends(manifest: Manifest, name: str) -> tuple[str, ...]:
    """Runtimes that can execute graph `name`: its form's (GraphEntry.backends), narrowed by
    its precision's (`quantization.<name>.backends`, e.g. MatMulNBits is onnxruntime's)."""
    backends = manifest.graphs[name].backends
    quantized = manifest.quantization.get(name)
    if isinstance(quantized, dict) and "backends" in quantized:
        backends = tuple(b for b in backends if b in quantized["backends"])
    return backends


def read_manifest(root: str | Path) -> Manifest:
    """manifest.json of the folder `root`, checked (schema and consistency) but no other file."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: not a folder")
    path = root / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        raise ManifestError(f"{root}: not an export folder ({MANIFEST_NAME} not found)")
    try:
        resolved = safe_join(root, MANIFEST_NAME, "file")
    except ManifestError:  # a symlink that leaves the folder: it would say what to trust
        raise ManifestError(f"{path}: resolves outside the export folder") from None
    if not resolved.is_file():
        raise ManifestError(f"{path}: not a file")
    return Manifest.from_dict(load_json(resolved, ManifestError), str(path))


def load_manifest(root: str | Path, verify_hashes: bool = True) -> Manifest:
    """Read and check an export folder: the manifest (`read_manifest`), every listed file
    present inside the folder with its sha256, and every external-data file the graphs name
    (read from the ONNX files themselves, `check_external_data`)."""
    root = Path(root)
    manifest = read_manifest(root)
    files = {name: safe_join(root, name, "file") for name in manifest.files}  # all paths first
    for name, file in files.items():
        if not file.is_file():
            raise ManifestError(f"{root}: file {name!r} listed in the manifest is missing")
    for name, digest in manifest.files.items():
        if verify_hashes and sha256_file(files[name]) != digest:
            raise ManifestError(
                f"{root}: file {name!r} does not match its sha256 in the manifest "
                "(modified or truncated after export)"
            )
    check_external_data(root, manifest)
    return manifest


def check_external_data(root: Path, manifest: Manifest) -> None:
    """Every external-data location inside each graph (what onnxruntime would open) is a
    relative path inside the folder, listed in the graph's `external_data` (so hashed), with
    offset + length inside the file. Our check, whatever onnxruntime/onnx version loads it."""
    for name, entry in manifest.graphs.items():
        graph = safe_join(root, entry.file, "file")
        try:
            tensors = external_tensors(graph)
        except OnnxFormatError as e:
            raise ManifestError(f"{graph}: not a loadable ONNX model ({e})") from e
        listed = {posixpath.normpath(x) for x in entry.external_data}
        for t in tensors:
            where = f"{graph}: tensor {t.tensor!r} external data {t.location!r}"
            if not t.location or t.location == ORT_MEMORY_LOCATION:
                raise ManifestError(f"{where}: not a file location")
            try:
                data = safe_join(root, t.location, "external data")
            except ManifestError:
                raise ManifestError(f"{where} is outside the export folder") from None
            if posixpath.normpath(t.location.replace("\\", "/")) not in listed:
                raise ManifestError(
                    f"{where} is not listed in graphs.{name}.external_data of {MANIFEST_NAME} "
                    "(the runtime reads only files the manifest hashes)"
                )
            size = data.stat().st_size
            try:
                offset = int(t.offset or 0)
                length = int(t.length) if t.length is not None else size - offset
            except ValueError:
                raise ManifestError(f"{where}: offset/length are not integers") from None
            if offset < 0 or length < 0 or offset + length > size:
                raise ManifestError(
                    f"{where}: bytes {offset}..{offset + length} lie outside the file "
                    f"({size} bytes)"
                )
