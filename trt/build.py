"""Build TensorRT engines from an export folder: `vision.engine`, `decoder.engine`, engines.json.

Written from the TensorRT Python API documentation (Builder, NetworkDefinitionCreationFlag,
OnnxParser.parse_from_file, IBuilderConfig: set_memory_pool_limit, add_optimization_profile,
create_timing_cache/set_timing_cache, progress_monitor; IProgressMonitor); not run here: no GPU,
no TensorRT in this repository's CI. Precision comes from the ONNX graph (ANCHORS: TensorRT 10
deprecates weak typing, 11 drops the FP16/INT8 flags), profiles from trt/profiles.py; one timing
cache per folder; the build is atomic (how: `build_engine`, `build_engines`; the steps on a
device: docs/jetson.md). A graph the parser refuses is a `BuildError` with its messages.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.engines import ENGINE_FILES, ENGINES_NAME, DeviceInfo, EngineEntry, EnginesManifest
from runtime.errors import FlamingoExportError
from runtime.manifest import Manifest, load_manifest, safe_join, sha256_file

from .device import CudaDevice, import_tensorrt
from .profiles import Limits, Profile, graph_profiles
from .targets import Target, get_target

TIMING_CACHE = "timing.cache"


class BuildError(FlamingoExportError, RuntimeError):
    """TensorRT refused the graph or the build failed."""


@dataclass(frozen=True)
class BuildPlan:
    """Everything about a build that does not need TensorRT."""

    limits: Limits
    target: Target | None
    workspace_bytes: int
    profiles: dict[str, list[Profile]]

    def shapes(self, manifest: Manifest, graph: str) -> list[dict[str, Any]]:
        spec = manifest.graphs[graph].spec
        records = []
        for p in self.profiles[graph]:
            shapes = {k: [list(c) for c in v] for k, v in p.shapes(spec).items()}
            records.append({**p.to_dict(), "shapes": shapes})
        return records


DEFAULT_WORKSPACE = 1 << 30


def make_build_plan(
    manifest: Manifest,
    target: str | None = None,
    max_batch: int | None = None,
    max_images: int | None = None,
    max_seq_len: int | None = None,
    max_frames: int | None = None,
) -> BuildPlan:
    """Limits (the export's, optionally lowered), profiles per graph, workspace per target.
    Raises BuildError for a decoder form TensorRT does not build (runtime.spec.DecoderForm)."""
    from runtime.spec import ModelDims

    form = manifest.graphs["decoder"].form
    if not form.portable:
        raise BuildError(
            f"the decoder is in form {form.to_dict()}, which runs on onnxruntime only; build "
            "TensorRT engines from an export in the portable form (export without "
            "--decoder-form)"
        )

    limits = Limits.resolve(manifest.limits, max_batch, max_images, max_seq_len, max_frames)
    dims = ModelDims.from_config(manifest.model)
    spec = get_target(target) if target else None
    profiles = {g: graph_profiles(g, dims, limits) for g in ENGINE_FILES}
    for graph, plist in profiles.items():  # every input shape resolvable, or fail before TRT
        for p in plist:
            p.shapes(manifest.graphs[graph].spec)
    workspace = spec.workspace_bytes if spec else DEFAULT_WORKSPACE
    return BuildPlan(limits, spec, workspace, profiles)


def source_hashes(manifest: Manifest, graph: str) -> dict[str, str]:
    entry = manifest.graphs[graph]
    return {f: manifest.files[f] for f in (entry.file, *entry.external_data)}


def engines_manifest(
    root: Path,
    manifest: Manifest,
    plan: BuildPlan,
    *,
    tensorrt_version: str,
    device: DeviceInfo,
    strongly_typed: bool,
    tools: dict[str, str] | None = None,
) -> EnginesManifest:
    """engines.json for engine files already in place under root (hashes them)."""
    engines = {
        graph: EngineEntry(
            file=file,
            sha256=sha256_file(safe_join(root, file)),
            source=source_hashes(manifest, graph),
            profiles=plan.shapes(manifest, graph),
        )
        for graph, file in ENGINE_FILES.items()
    }
    return EnginesManifest(
        tensorrt_version=tensorrt_version,
        device={"name": device.name, "compute_capability": device.compute_capability},
        target=plan.target.name if plan.target else None,
        limits=plan.limits.to_dict(),
        strongly_typed=strongly_typed,
        workspace_bytes=plan.workspace_bytes,
        engines=engines,
        export_manifest_sha256=sha256_file(root / "manifest.json"),
        tools=tools or {},
    )


# ---------------------------------------------------------------------------------------------
# TensorRT
# ---------------------------------------------------------------------------------------------


def _progress_monitor(trt: Any, say: Callable[[str], None]) -> Any:
    """An IProgressMonitor (TensorRT >= 10) that prints top-level phases and 10% steps."""

    class Monitor(trt.IProgressMonitor):  # type: ignore[name-defined, misc]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.depth: dict[str, int] = {}
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            depth = self.depth.get(parent_phase, -1) + 1 if parent_phase else 0
            self.depth[phase_name] = depth
            self.steps[phase_name] = num_steps
            if depth <= 1:
                say(f"{'  ' * depth}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            n = self.steps.get(phase_name, 0)
            if self.depth.get(phase_name, 9) == 0 and n >= 10 and (step + 1) % (n // 10) == 0:
                say(f"  {phase_name}: {step + 1}/{n}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            self.depth.pop(phase_name, None)

    return Monitor()


def _flag(trt: Any, name: str) -> Any:
    return getattr(trt.NetworkDefinitionCreationFlag, name, None)


def build_engine(
    trt: Any,
    onnx_path: Path,
    spec: Any,
    precision: str,
    profiles: list[Profile],
    workspace_bytes: int,
    timing_cache: bytes,
    out_path: Path,
    say: Callable[[str], None],
) -> tuple[int, bytes, bool]:
    """Build one ONNX graph into out_path (atomically); (engine bytes, updated timing cache,
    strongly typed?).

    Where `NetworkDefinitionCreationFlag.STRONGLY_TYPED` exists (TensorRT >= 9.1/10) the network
    is strongly typed; on 8.5/8.6 the builder flags are set from the graph's precision (fp16 ->
    FP16, int8 -> INT8 + FP16; int4 needs TensorRT 10). TF32 is cleared for fp32 graphs so
    TensorRT computes what onnxruntime computes on that file. The parser reads the model from
    its path, so external data (`<graph>.onnx.data`) is found beside it without loading the
    model into Python. A timing cache from another device or TensorRT is replaced by a fresh one.
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    major = int(trt.__version__.split(".")[0])
    explicit = _flag(trt, "EXPLICIT_BATCH")
    if major < 10 and explicit is not None:
        flags |= 1 << int(explicit)
    strongly = _flag(trt, "STRONGLY_TYPED")
    if strongly is not None:
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    say(f"parsing {onnx_path.name}")
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(
            f"TensorRT {trt.__version__} could not parse {onnx_path.name}:\n  "
            + "\n  ".join(errors)
            + "\n(run `flamingo-export check` for the static rules of this TensorRT version)"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if strongly is None:  # weakly typed TensorRT 8.x: precision flags from the graph
        if precision == "int4":
            raise BuildError("int4 (blocked DequantizeLinear) needs TensorRT 10 (JetPack 6.1+)")
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit Q/DQ in the graph, no calibrator
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32, as onnxruntime computes it
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes(spec).items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        say("timing cache from another device/TensorRT: starting a fresh one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=True)
    monitor = None  # referenced until this function returns: TensorRT calls into it
    if hasattr(trt, "IProgressMonitor"):
        monitor = _progress_monitor(trt, say)
        config.progress_monitor = monitor
    else:
        say("building (TensorRT < 10 reports no progress; this takes minutes)")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT failed to build {onnx_path.name} (see the log above)")
    say(f"{onnx_path.name}: built in {time.perf_counter() - start:.0f} s")
    size = serialized.nbytes
    _write_atomic(out_path, serialized)  # straight from TensorRT's buffer: no second host copy
    del serialized
    new_cache = bytes(memoryview(config.get_timing_cache().serialize()))
    return size, new_cache, strongly is not None


def _write_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    tmp.replace(path)


def build_engines(
    export_dir: str | Path,
    *,
    target: str | None = None,
    max_batch: int | None = None,
    max_images: int | None = None,
    max_seq_len: int | None = None,
    progress: Callable[[str], None] | None = print,
    max_frames: int | None = None,
) -> EnginesManifest:
    """Build both engines into the export folder; returns what engines.json records.

    Profiles come from trt/profiles.py (vision: images [+ clips]; decoder: prefill, extend,
    decode). One
    timing cache, `OUT/timing.cache`, is loaded if present and saved after each engine, so a
    rebuild on the same device reuses the kernel timings. Atomic: the old engines.json is
    removed first, engines are written to temporary files and renamed, and engines.json (sha256
    of the engines and of their source ONNX files, TensorRT version, device, profiles) is written
    last: an interrupted build leaves no engines.json, and the runtime refuses to load without
    one.
    """
    say = progress or (lambda _msg: None)
    trt = import_tensorrt()
    root = Path(export_dir)
    manifest = load_manifest(root)
    plan = make_build_plan(manifest, target, max_batch, max_images, max_seq_len, max_frames)
    device = CudaDevice()
    info = device.info()
    device.close()
    if plan.target and plan.target.compute_capability not in (None, info.compute_capability):
        say(
            f"warning: target {plan.target.name} is compute capability "
            f"{plan.target.compute_capability}, this GPU ({info.name}) is "
            f"{info.compute_capability}: the engines will run only on this kind of GPU"
        )
    say(f"TensorRT {trt.__version__} on {info.name} (sm {info.compute_capability})")
    cache_path = root / TIMING_CACHE
    cache = cache_path.read_bytes() if cache_path.is_file() else b""
    (root / ENGINES_NAME).unlink(missing_ok=True)
    strongly_typed = True
    for graph, file in ENGINE_FILES.items():
        entry = manifest.graphs[graph]
        size, cache, strongly_typed = build_engine(
            trt,
            safe_join(root, entry.file),
            entry.spec,
            entry.precision,
            plan.profiles[graph],
            plan.workspace_bytes,
            cache,
            root / file,
            say,
        )
        _write_atomic(cache_path, cache)
        say(f"wrote {file} ({size / 2**20:.1f} MiB)")
    engines = engines_manifest(
        root,
        manifest,
        plan,
        tensorrt_version=trt.__version__,
        device=info,
        strongly_typed=strongly_typed,
        tools={"tensorrt": trt.__version__},
    )
    engines.write(root)
    say(f"wrote {ENGINES_NAME}")
    return engines
