"""engines.json: what `flamingo-export build` built, from which export, for which TensorRT and GPU.

An engine is tied to the ONNX files it came from, to the TensorRT version and to the GPU it was
built on. engines.json records all three; `load_engines_manifest` reads it (sha256 of every
engine file), `check_against_export` checks it against the export's manifest (the sha256 of
the source ONNX files, limits) and `check_against_device` against the running TensorRT and GPU.
Any mismatch is an `EngineMismatchError` that says what to rebuild. Plain JSON and hashing: no
TensorRT, CUDA or torch here (trt/build.py writes it, trt/engine.py reads it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FlamingoExportError
from .manifest import Manifest, ManifestError, safe_join, sha256_file
from .schema import load_json

ENGINES_NAME = "engines.json"
ENGINES_SCHEMA_VERSION = 1
ENGINE_FILES = {"vision": "vision.engine", "decoder": "decoder.engine"}


class EngineMismatchError(FlamingoExportError, ValueError):
    """engines.json does not match the export, the engine files, TensorRT or the GPU."""


@dataclass
class EngineEntry:
    file: str
    sha256: str
    source: dict[str, str]  # ONNX file (+ external data) -> sha256, as in the export manifest
    profiles: list[dict[str, Any]]  # {"name", "dims": {dim: [min, opt, max]}, "shapes": {...}}

    def profile_index(self, name: str) -> int:
        for i, p in enumerate(self.profiles):
            if p["name"] == name:
                return i
        raise EngineMismatchError(
            f"{self.file}: no optimization profile {name!r} "
            f"(has {[p['name'] for p in self.profiles]})"
        )

    def dim_range(self, profile: str, dim: str) -> tuple[int, int, int]:
        lo, opt, hi = self.profiles[self.profile_index(profile)]["dims"][dim]
        return lo, opt, hi

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "source": self.source,
            "profiles": self.profiles,
        }


@dataclass
class EnginesManifest:
    tensorrt_version: str
    device: dict[str, str]  # name, compute_capability
    target: str | None
    limits: dict[str, int]  # max_batch, max_images, max_seq_len, max_frames
    strongly_typed: bool
    workspace_bytes: int
    engines: dict[str, EngineEntry]
    export_manifest_sha256: str
    tools: dict[str, str] = field(default_factory=dict)
    schema_version: int = ENGINES_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "tensorrt_version": self.tensorrt_version,
            "device": self.device,
            "target": self.target,
            "limits": self.limits,
            "strongly_typed": self.strongly_typed,
            "workspace_bytes": self.workspace_bytes,
            "export_manifest_sha256": self.export_manifest_sha256,
            "engines": {k: e.to_dict() for k, e in self.engines.items()},
            "tools": self.tools,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = ENGINES_NAME) -> EnginesManifest:
        if not isinstance(d, dict):
            raise EngineMismatchError(f"{where}: not a JSON object")
        version = d.get("schema_version")
        if version != ENGINES_SCHEMA_VERSION:
            raise EngineMismatchError(
                f"{where}: schema_version {version!r} is not supported (expected "
                f"{ENGINES_SCHEMA_VERSION}); rebuild with `flamingo-export build`"
            )
        try:
            engines = {
                name: EngineEntry(e["file"], e["sha256"], dict(e["source"]), list(e["profiles"]))
                for name, e in d["engines"].items()
            }
            out = cls(
                tensorrt_version=str(d["tensorrt_version"]),
                device={k: str(v) for k, v in d["device"].items()},
                target=d.get("target"),
                limits={k: int(v) for k, v in d["limits"].items()},
                strongly_typed=bool(d["strongly_typed"]),
                workspace_bytes=int(d["workspace_bytes"]),
                engines=engines,
                export_manifest_sha256=str(d["export_manifest_sha256"]),
                tools=dict(d.get("tools", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise EngineMismatchError(f"{where}: invalid ({type(e).__name__}: {e})") from e
        missing = [g for g in ENGINE_FILES if g not in engines]
        if missing:
            raise EngineMismatchError(f"{where}: engines {missing} missing")
        for key in ("name", "compute_capability"):
            if key not in out.device:
                raise EngineMismatchError(f"{where}: device.{key} missing")
        for key in ("max_batch", "max_images", "max_seq_len", "max_frames"):
            if out.limits.get(key, 0) < 1:
                raise EngineMismatchError(f"{where}: limits.{key} missing or < 1")
        names = {p.get("name") for p in engines["decoder"].profiles}
        if not {"prefill", "decode"} <= names:
            raise EngineMismatchError(
                f"{where}: the decoder engine needs 'prefill' and 'decode' profiles, has "
                f"{sorted(n for n in names if n)}"
            )
        return out

    def write(self, root: Path) -> Path:
        """Atomically (temp file + rename): a reader never sees a half-written engines.json."""
        path = root / ENGINES_NAME
        tmp = root / f".{ENGINES_NAME}.tmp"
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path


def load_engines_manifest(root: str | Path, verify_hashes: bool = True) -> EnginesManifest:
    root = Path(root)
    path = root / ENGINES_NAME
    if not path.is_file():
        raise EngineMismatchError(
            f"{root}: no {ENGINES_NAME}; build the engines with `flamingo-export build {root}`"
        )
    try:
        resolved = safe_join(root, ENGINES_NAME, "file")
    except ManifestError:  # like manifest.json: what says which hashes to trust stays inside
        raise EngineMismatchError(f"{path}: resolves outside the export folder") from None
    engines = EnginesManifest.from_dict(load_json(resolved, EngineMismatchError), str(path))
    for name, entry in engines.engines.items():
        file = safe_join(root, entry.file)
        if not file.is_file():
            raise EngineMismatchError(f"{root}: {name} engine {entry.file!r} is missing")
        if verify_hashes and sha256_file(file) != entry.sha256:
            raise EngineMismatchError(
                f"{root}: {entry.file!r} does not match its sha256 in {ENGINES_NAME} "
                "(modified or truncated after build)"
            )
    return engines


def check_against_export(engines: EnginesManifest, manifest: Manifest, root: Path) -> None:
    """The engines were built from these exact ONNX files, within the export's limits."""
    digest = sha256_file(root / "manifest.json")
    for name, entry in engines.engines.items():
        graph = manifest.graphs.get(name)
        if graph is None:
            raise EngineMismatchError(f"{root}: the export has no {name!r} graph")
        expected = {f: manifest.files[f] for f in (graph.file, *graph.external_data)}
        if entry.source != expected:
            changed = sorted(f for f in set(expected) | set(entry.source)
                             if expected.get(f) != entry.source.get(f))  # fmt: skip
            raise EngineMismatchError(
                f"{root}: {entry.file} was built from other ONNX files than this export's "
                f"({', '.join(changed)} differ); rebuild with `flamingo-export build {root}`"
            )
    if engines.export_manifest_sha256 != digest:
        raise EngineMismatchError(
            f"{root}: manifest.json changed since the engines were built; rebuild them"
        )
    for key in ("max_images", "max_seq_len", "max_frames"):
        if engines.limits[key] > manifest.limits[key]:
            raise EngineMismatchError(
                f"{root}: engines built for {key} {engines.limits[key]} > the export's "
                f"{manifest.limits[key]}"
            )


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str  # "8.7"


def check_against_device(
    engines: EnginesManifest, tensorrt_version: str, device: DeviceInfo, strict_name: bool = True
) -> None:
    """An engine runs only with the TensorRT version and the GPU it was built with."""
    if engines.tensorrt_version != tensorrt_version:
        raise EngineMismatchError(
            f"engines were built with TensorRT {engines.tensorrt_version}, this is TensorRT "
            f"{tensorrt_version}: rebuild them here (`flamingo-export build`)"
        )
    built_cc = engines.device["compute_capability"]
    if built_cc != device.compute_capability:
        raise EngineMismatchError(
            f"engines were built for compute capability {built_cc} "
            f"({engines.device['name']}), this GPU is {device.compute_capability} "
            f"({device.name}): rebuild them on this device"
        )
    if strict_name and engines.device["name"] != device.name:
        raise EngineMismatchError(
            f"engines were built on {engines.device['name']!r}, this GPU is {device.name!r} "
            "(same compute capability; TensorRT tunes kernels per device): rebuild, or pass "
            "strict_device=False to accept"
        )
