"""TensorRT execution of an export folder's engines, with the KV cache resident on the device.

`flamingo-export build` writes `vision.engine`, `decoder.engine` and `engines.json` into the
export folder. This module reads them back:

* `load_engines_manifest` / `check_against_export` / `check_against_device`: engines.json is
  checked against the export's manifest (the sha256 of the ONNX files the engines came from,
  limits) and against the running TensorRT version and GPU (an engine is tied to both); any
  mismatch is an `EngineMismatchError` that says what to rebuild. No TensorRT needed for this.
* `TrtFlamingo`: the same surface as `runtime.engine.OnnxFlamingo` (encode_images,
  rows_cross_kv, step_model, token ids, specs) over TensorRT, so `runtime.pipeline` and
  `runtime.generation` drive it unchanged (`trt_pipeline`).
* `TrtStepModel`: the `step`/`reorder_cache` contract (and OrtStepModel's `run`, `past`
  start, `past_arrays` for the prefix cache). Device buffers are allocated once, at the
  engines' max_batch x max_seq_len: per layer two K and two V buffers. A call reads the past
  from one and TensorRT writes the present (past + new, what the graph outputs) into the other;
  the next call binds that buffer as its past. A (batch, heads, length, head_dim) tensor is
  contiguous in either buffer, so nothing is copied, and nothing goes to the host per decode
  step except the last position's logits. Beam reordering copies rows device-to-device.
  New tokens go to the decoder's "prefill" (past 0), "extend" (a short chunk after a cached
  prefix) or "decode" (one token) profile; what no profile covers is run in chunks.

Written from the TensorRT Python API documentation (ICudaEngine/IExecutionContext name-based
I/O: `get_tensor_dtype`, `set_input_shape`, `set_tensor_address`,
`set_optimization_profile_async`, `execute_async_v3`, all TensorRT >= 8.5;
`Runtime.deserialize_cuda_engine`; one user-managed activation block for both engines:
`create_execution_context(ExecutionContextAllocationStrategy.USER_MANAGED)` +
`set_device_memory` on 10.x, `create_execution_context_without_device_memory` + `device_memory`
on 8.x) and the CUDA runtime API as exposed by cuda-python (`cudaMalloc`, `cudaMemcpyAsync`,
`cudaMemcpy2DAsync`, `cudaStreamSynchronize`, `cudaGetDeviceProperties`). Not run against a
GPU in this repository: the buffer protocol is tested with `HostDevice` and an onnxruntime
executor standing in for TensorRT (tests/test_trt_build.py).
"""

from __future__ import annotations

import json
import mmap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime.decoding import (
    MediaCounter,
    RowsCrossKV,
    current_image_offsets,
    logits_index,
    position_ids,
)
from runtime.errors import FlamingoExportError
from runtime.manifest import Manifest, load_manifest, safe_join, sha256_file
from runtime.spec import ModelDims, cross_attn_names, past_names, present_names

ENGINES_NAME = "engines.json"
ENGINES_SCHEMA_VERSION = 1
ENGINE_FILES = {"vision": "vision.engine", "decoder": "decoder.engine"}


class EngineMismatchError(FlamingoExportError, ValueError):
    """engines.json does not match the export, the engine files, TensorRT or the GPU."""


class TensorRTUnavailableError(FlamingoExportError, RuntimeError):
    """tensorrt (or cuda-python) cannot be imported here."""


# ---------------------------------------------------------------------------------------------
# engines.json
# ---------------------------------------------------------------------------------------------


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
    limits: dict[str, int]  # max_batch, max_images, max_seq_len
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
        for key in ("max_batch", "max_images", "max_seq_len"):
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
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineMismatchError(f"{path}: invalid JSON ({e})") from e
    engines = EnginesManifest.from_dict(data, str(path))
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
    for key in ("max_images", "max_seq_len"):
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


# ---------------------------------------------------------------------------------------------
# Device memory and execution, behind two small protocols
# ---------------------------------------------------------------------------------------------


class Device(Protocol):
    """Device memory on one stream. Pointers are ints."""

    def alloc(self, nbytes: int) -> int: ...
    def free(self, ptr: int) -> None: ...
    def upload(self, ptr: int, array: np.ndarray) -> None: ...
    def download(self, out: np.ndarray, ptr: int) -> None: ...
    def download_rows(
        self, out: np.ndarray, ptr: int, src_pitch: int, row_bytes: int, rows: int
    ) -> None: ...
    def copy(self, dst: int, src: int, nbytes: int) -> None: ...
    def synchronize(self) -> None: ...


class Executor(Protocol):
    """One engine's execution context (what TrtStepModel needs of TensorRT)."""

    def tensor_dtype(self, name: str) -> np.dtype: ...
    def set_profile(self, index: int) -> None: ...
    def set_input_shape(self, name: str, shape: Sequence[int]) -> None: ...
    def set_address(self, name: str, ptr: int) -> None: ...
    def execute(self) -> None: ...


class HostDevice:
    """Numpy stand-in for a CUDA device: same pointer arithmetic, bounds-checked.

    Lets the step model's buffer protocol (ping-pong KV, row copies, strided logits) be tested
    without a GPU; also usable to run an Executor that computes on the host.
    """

    _SPAN = 1 << 40

    def __init__(self) -> None:
        self._blocks: dict[int, np.ndarray] = {}
        self._next = 1

    def alloc(self, nbytes: int) -> int:
        base = self._next * self._SPAN
        self._next += 1
        self._blocks[base] = np.zeros(max(1, nbytes), dtype=np.uint8)
        return base

    def free(self, ptr: int) -> None:
        self._blocks.pop(ptr, None)

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        base = (ptr // self._SPAN) * self._SPAN
        block = self._blocks.get(base)
        offset = ptr - base
        if block is None or offset < 0 or offset + nbytes > block.size:
            raise IndexError(f"device access [{ptr:#x}, +{nbytes}) outside any allocation")
        return block[offset : offset + nbytes]

    def upload(self, ptr: int, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        self.view(ptr, data.size)[:] = data

    def download(self, out: np.ndarray, ptr: int) -> None:
        out.view(np.uint8).reshape(-1)[:] = self.view(ptr, out.nbytes)

    def download_rows(
        self, out: np.ndarray, ptr: int, src_pitch: int, row_bytes: int, rows: int
    ) -> None:
        flat = out.view(np.uint8).reshape(rows, row_bytes)
        for r in range(rows):
            flat[r] = self.view(ptr + r * src_pitch, row_bytes)

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        self.view(dst, nbytes)[:] = self.view(src, nbytes).copy()

    def synchronize(self) -> None:
        pass


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise TensorRTUnavailableError(
                "cuda-python is not installed (pip install 'flamingo-export[tensorrt]')"
            ) from e
    return cudart


class CudaDevice:
    """Device memory through the CUDA runtime API (cuda-python), one stream."""

    def __init__(self) -> None:
        self.cudart = _cudart()
        self.stream = self._call(self.cudart.cudaStreamCreate())
        self._allocs: set[int] = set()

    def _call(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            name = getattr(err, "name", str(err))
            raise RuntimeError(f"CUDA runtime error {name}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else tuple(rest)

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def info(self) -> DeviceInfo:
        dev = self._call(self.cudart.cudaGetDevice())
        prop = self._call(self.cudart.cudaGetDeviceProperties(dev))
        name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
        return DeviceInfo(name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}")

    def alloc(self, nbytes: int) -> int:
        ptr = int(self._call(self.cudart.cudaMalloc(max(1, nbytes))))
        self._allocs.add(ptr)
        return ptr

    def free(self, ptr: int) -> None:
        if ptr in self._allocs:
            self._allocs.discard(ptr)
            self._call(self.cudart.cudaFree(ptr))

    def upload(self, ptr: int, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.cudart.cudaMemcpyAsync(ptr, a.ctypes.data, a.nbytes, kind, self.stream))

    def download(self, out: np.ndarray, ptr: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, kind, self.stream))

    def download_rows(
        self, out: np.ndarray, ptr: int, src_pitch: int, row_bytes: int, rows: int
    ) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(
            self.cudart.cudaMemcpy2DAsync(
                out.ctypes.data, row_bytes, ptr, src_pitch, row_bytes, rows, kind, self.stream
            )
        )

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._call(self.cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream))

    def synchronize(self) -> None:
        self._call(self.cudart.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        for ptr in list(self._allocs):
            self.free(ptr)
        self._call(self.cudart.cudaStreamDestroy(self.stream))


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailableError(
            "TensorRT's Python package is not importable here. On Jetson it comes with JetPack "
            "(python3-libnvinfer); on x86: pip install 'flamingo-export[tensorrt]'"
        ) from e
    return trt


class TrtExecutor:
    """Executor over a deserialized ICudaEngine (name-based I/O, TensorRT >= 8.5)."""

    def __init__(self, trt: Any, engine: Any, device: CudaDevice, memory_ptr: int) -> None:
        self.trt, self.engine, self.device = trt, engine, device
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategy is not None:  # TensorRT >= 10: the old call is deprecated
            self.context = engine.create_execution_context(strategy.USER_MANAGED)
        else:
            self.context = engine.create_execution_context_without_device_memory()
        if self.context is None:
            raise RuntimeError("TensorRT could not create an execution context")
        if hasattr(self.context, "set_device_memory"):  # TensorRT >= 10.1
            self.context.set_device_memory(memory_ptr, device_memory_size(engine))
        else:
            self.context.device_memory = memory_ptr
        self.profile = 0

    def tensor_dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def set_profile(self, index: int) -> None:
        if index != self.profile:
            ok = self.context.set_optimization_profile_async(index, self.device.stream_handle)
            if not ok:
                raise RuntimeError(f"TensorRT refused optimization profile {index}")
            self.profile = index

    def set_input_shape(self, name: str, shape: Sequence[int]) -> None:
        if not self.context.set_input_shape(name, tuple(int(s) for s in shape)):
            raise ValueError(
                f"TensorRT refused shape {tuple(shape)} for {name!r} "
                f"(outside optimization profile {self.profile})"
            )

    def set_address(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, int(ptr)):
            raise RuntimeError(f"TensorRT refused the address of {name!r}")

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.device.stream_handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")


def device_memory_size(engine: Any) -> int:
    size = getattr(engine, "device_memory_size_v2", None)  # TensorRT >= 10.1
    return int(size if size is not None else engine.device_memory_size)


# ---------------------------------------------------------------------------------------------
# Buffers, engines, step model
# ---------------------------------------------------------------------------------------------


class PingPong:
    """Two equal device buffers; `current` holds the state, `spare` receives the next one."""

    def __init__(self, device: Device, nbytes: int) -> None:
        self.ptrs = (device.alloc(nbytes), device.alloc(nbytes))
        self.nbytes = nbytes
        self.index = 0

    @property
    def current(self) -> int:
        return self.ptrs[self.index]

    @property
    def spare(self) -> int:
        return self.ptrs[1 - self.index]

    def flip(self) -> None:
        self.index = 1 - self.index


def _runs(index: np.ndarray) -> list[tuple[int, int, int]]:
    """(dst_row, src_row, rows) runs of consecutive rows: fewer device copies."""
    runs: list[tuple[int, int, int]] = []
    for dst, src in enumerate(int(i) for i in index):
        if runs and runs[-1][1] + runs[-1][2] == src and runs[-1][0] + runs[-1][2] == dst:
            d, s, n = runs[-1]
            runs[-1] = (d, s, n + 1)
        else:
            runs.append((dst, src, 1))
    return runs


class TrtFlamingo(RowsCrossKV):
    """An export folder + its TensorRT engines, with OnnxFlamingo's surface."""

    def __init__(
        self,
        export_dir: str | Path,
        *,
        device: Device | None = None,
        executors: dict[str, Executor] | None = None,
        verify_hashes: bool = True,
        strict_device: bool = True,
    ) -> None:
        """Real use: no device/executors (TensorRT and cuda-python are imported, engines.json
        checked against this GPU). Tests pass a HostDevice and stand-in executors."""
        self.root = Path(export_dir)
        self.manifest: Manifest = load_manifest(self.root, verify_hashes=verify_hashes)
        self.engines = load_engines_manifest(self.root, verify_hashes=verify_hashes)
        check_against_export(self.engines, self.manifest, self.root)
        self.dims = ModelDims.from_config(self.manifest.model)
        self.limits = self.engines.limits
        self.vision_spec = self.manifest.graphs["vision"].spec
        self.decoder_spec = self.manifest.graphs["decoder"].spec
        tokens = self.manifest.special_tokens
        self.media_token_id: int = tokens["media_token_id"]
        self.eoc_token_id: int = tokens["eoc_token_id"]
        self.pad_token_id: int = tokens["pad_token_id"]
        self._trt_objects: list[Any] = []
        if executors is None:
            device, executors = self._load_tensorrt(strict_device)
        assert device is not None
        self.device = device
        self.executors = executors
        self.float_dtype = executors["decoder"].tensor_dtype(present_names(0)[0])
        self._active: TrtStepModel | None = None
        self._allocate()

    def _load_tensorrt(self, strict_device: bool) -> tuple[Device, dict[str, Executor]]:
        trt = import_tensorrt()
        device = CudaDevice()
        check_against_device(self.engines, trt.__version__, device.info(), strict_device)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engines = {}
        for name, entry in self.engines.engines.items():
            path = safe_join(self.root, entry.file)
            # A read-only map instead of f.read(): on Jetson (one DRAM for CPU and GPU) the
            # pages are file-backed and reclaimable, not a second anonymous copy of the weights.
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                engine = runtime.deserialize_cuda_engine(m)
            if engine is None:
                raise EngineMismatchError(f"{path}: TensorRT could not deserialize the engine")
            engines[name] = engine
        # vision and decoder never run at the same time: one activation block serves both
        memory = device.alloc(max(device_memory_size(e) for e in engines.values()))
        executors = {n: TrtExecutor(trt, e, device, memory) for n, e in engines.items()}
        self._trt_objects = [logger, runtime, engines]
        return device, executors

    def _allocate(self) -> None:
        """All step buffers once, at the engines' limits (nothing allocated per step)."""
        d, lim, dev = self.dims, self.limits, self.device
        b, s, imgs = lim["max_batch"], lim["max_seq_len"], lim["max_images"]
        dec = self.executors["decoder"]
        kv_item = dec.tensor_dtype(past_names(0)[0]).itemsize
        kv_bytes = b * d.num_kv_heads * s * d.head_dim * kv_item
        self.kv = {n: PingPong(dev, kv_bytes) for i in range(d.num_layers) for n in past_names(i)}
        x_names = [n for j in d.xattn_layers for n in cross_attn_names(j)]
        x_item = dec.tensor_dtype(x_names[0]).itemsize if x_names else 4
        x_bytes = b * d.xattn_heads * imgs * d.num_latents * d.xattn_dim_head * x_item
        self.cross = {n: PingPong(dev, x_bytes) for n in x_names}
        # each row's current image's K/V, what decode steps bind (runtime.decoding)
        local_bytes = b * d.xattn_heads * d.num_latents * d.xattn_dim_head * x_item
        self.cross_local = {n: dev.alloc(local_bytes) for n in x_names}
        self.int_inputs = {
            t.name: dev.alloc(b * s * 8)
            for t in self.decoder_spec.inputs
            if t.dtype == "int64"  # ids, mask, positions, media index (8 bytes covers int32)
        }
        self.logits_capacity = 0
        self.logits_ptr = 0
        vis = self.executors["vision"]
        self.vision_in = dev.alloc(
            int(np.prod((imgs, 3, d.image_size, d.image_size)))
            * vis.tensor_dtype("pixel_values").itemsize
        )
        self.vision_out: dict[str, int] = {}
        for t in self.vision_spec.outputs:
            per_image = int(np.prod([x for x in t.shape if isinstance(x, int)]))
            item = vis.tensor_dtype(t.name).itemsize
            self.vision_out[t.name] = dev.alloc(imgs * per_image * item)

    def logits_buffer(self, nbytes: int) -> int:
        """Grow-only (the prefill logits are the largest; decode reuses the buffer)."""
        if nbytes > self.logits_capacity:
            if self.logits_ptr:
                self.device.free(self.logits_ptr)
            self.logits_ptr = self.device.alloc(nbytes)
            self.logits_capacity = nbytes
        return self.logits_ptr

    def encode_images(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """(N, 3, S, S) pixels -> {image_latents, cross_attn.{j}.key|value} on the host (once
        per prompt, not per step: the pipeline arranges them per row)."""
        n = pixel_values.shape[0]
        if not 1 <= n <= self.limits["max_images"]:
            raise ValueError(
                f"{n} images: the vision engine was built for 1..{self.limits['max_images']}"
            )
        vis, dev = self.executors["vision"], self.device
        vis.set_profile(0)
        pixels = np.ascontiguousarray(pixel_values, dtype=vis.tensor_dtype("pixel_values"))
        dev.upload(self.vision_in, pixels)
        vis.set_input_shape("pixel_values", pixels.shape)
        vis.set_address("pixel_values", self.vision_in)
        outs = {}
        for t in self.vision_spec.outputs:
            shape = tuple(n if isinstance(x, str) else x for x in t.shape)
            outs[t.name] = np.empty(shape, dtype=vis.tensor_dtype(t.name))
            vis.set_address(t.name, self.vision_out[t.name])
        vis.execute()
        for name, out in outs.items():
            dev.download(out, self.vision_out[name])
        dev.synchronize()
        return outs

    def step_model(
        self,
        cross_kv: dict[str, np.ndarray],
        num_images: np.ndarray,
        past: dict[str, np.ndarray] | None = None,
        media_count: np.ndarray | None = None,
        io_binding: bool = True,
    ) -> TrtStepModel:
        """OrtStepModel's signature: `past` (a cached prefix, host arrays) is uploaded once;
        `io_binding` is accepted and ignored (the KV cache is always device-resident here)."""
        model = TrtStepModel(self, cross_kv, num_images, past, media_count)
        self._active = model
        return model


@dataclass(frozen=True)
class _Piece:
    profile: int
    tokens: int


class TrtStepModel:
    """StepModel over the decoder engine; the KV cache never leaves the device.

    Uses the buffers of its TrtFlamingo: creating a new step model ends the previous one.
    A step's new tokens run as one engine call when a profile covers them (prefill: past 0;
    extend: a short chunk after a cached prefix; decode: one token), else as several chunks.
    """

    def __init__(
        self,
        engine: TrtFlamingo,
        cross_kv: dict[str, np.ndarray],
        num_images: np.ndarray,
        past: dict[str, np.ndarray] | None = None,
        media_count: np.ndarray | None = None,
    ) -> None:
        self.engine = engine
        self.dec = engine.executors["decoder"]
        self.dev = engine.device
        dims = engine.dims
        self.dims = dims
        self.batch = len(num_images)
        self._check_batch(self.batch)
        self.media = MediaCounter(engine.media_token_id, num_images)
        if media_count is not None:
            self.media.count = np.asarray(media_count, dtype=np.int64).copy()
        entry = engine.engines.engines["decoder"]
        self.max_seq_len = engine.limits["max_seq_len"]
        self.prefill = entry.profile_index("prefill")
        self.decode = entry.profile_index("decode")
        names = [p["name"] for p in entry.profiles]
        if "extend" in names:
            self.extend: int | None = entry.profile_index("extend")
            self.extend_tokens = entry.dim_range("extend", "sequence")[2]
            self.extend_past = entry.dim_range("extend", "past_sequence")[2]
        else:
            self.extend, self.extend_tokens, self.extend_past = None, 0, 0
        self.prefill_end: float | None = None  # perf_counter() after the first step
        first = next(iter(cross_kv.values()))
        self.media_keys = first.shape[2]
        most = engine.limits["max_images"] * dims.num_latents
        if self.media_keys > most:
            raise ValueError(
                f"{self.media_keys // dims.num_latents} images per row exceed the engines' "
                f"max_images {engine.limits['max_images']}"
            )
        for name, value in cross_kv.items():
            engine.cross[name].index = 0
            array = np.ascontiguousarray(value, dtype=self.dec.tensor_dtype(name))
            self.dev.upload(engine.cross[name].current, array)
        self._local_offsets: tuple[int, ...] | None = None  # rows in engine.cross_local
        self.past_len = 0
        for buf in engine.kv.values():
            buf.index = 0
        if past is not None:
            self._upload_past(past)

    def _upload_past(self, past: dict[str, np.ndarray]) -> None:
        length = int(next(iter(past.values())).shape[2])
        if length >= self.max_seq_len:
            raise ValueError(
                f"a cached past of {length} tokens leaves no room in max_seq_len {self.max_seq_len}"
            )
        for name, buf in self.engine.kv.items():
            value = past[name]
            if value.shape[0] != self.batch or value.shape[2] != length:
                raise ValueError(f"past {name!r} has shape {value.shape}")
            self.dev.upload(buf.current, np.ascontiguousarray(value, self.dec.tensor_dtype(name)))
        self.dev.synchronize()
        self.past_len = length

    # ------------------------------------------------------------------ checks

    def _check_batch(self, batch: int) -> None:
        most = self.engine.limits["max_batch"]
        if batch > most:
            raise ValueError(
                f"batch {batch} exceeds the engines' max_batch {most}; rebuild with "
                f"`flamingo-export build --max-batch {batch}` (beam search needs one row per beam)"
            )

    def _check_active(self) -> None:
        if self.engine._active is not self:
            raise RuntimeError("a newer step model of this engine owns the device buffers")

    # ------------------------------------------------------------------ state

    @property
    def past_length(self) -> int:
        return self.past_len

    def past_arrays(self) -> dict[str, np.ndarray]:
        """The KV cache copied to the host (for prefix-cache snapshots; not used per step)."""
        self._check_active()
        d = self.dims
        out = {}
        for name, buf in self.engine.kv.items():
            shape = (self.batch, d.num_kv_heads, self.past_len, d.head_dim)
            out[name] = np.empty(shape, dtype=self.dec.tensor_dtype(name))
            self.dev.download(out[name], buf.current)
        self.dev.synchronize()
        return out

    # ------------------------------------------------------------------ running

    def _pieces(self, past: int, new: int) -> list[_Piece]:
        """How `new` tokens after `past` cached ones split over the engine's profiles."""
        pieces = []
        while new > 0:
            if past == 0:
                n, profile = new, self.prefill
            elif new == 1 or self.extend is None or past > self.extend_past:
                n, profile = 1, self.decode
            else:
                n, profile = min(new, self.extend_tokens), self.extend
            pieces.append(_Piece(profile, n))
            past, new = past + n, new - n
        return pieces

    def _bind_int(self, name: str, values: np.ndarray) -> None:
        dtype = self.dec.tensor_dtype(name)  # int32 on TensorRT < 9 (INT64 bound as INT32)
        array = np.ascontiguousarray(values, dtype=dtype)
        ptr = self.engine.int_inputs[name]
        self.dev.upload(ptr, array)
        self.dec.set_input_shape(name, array.shape)
        self.dec.set_address(name, ptr)

    def _run_piece(
        self, profile: int, ids: np.ndarray, mask: np.ndarray, all_positions: bool
    ) -> tuple[int, int]:
        """One engine call for ids (B, T) after past_len cached tokens; (logits ptr, number of
        logit positions: T, or 1 = the last unless all_positions)."""
        dims, dec = self.dims, self.dec
        b, t = ids.shape
        past = self.past_len
        dec.set_profile(profile)
        self._bind_int("input_ids", ids)
        self._bind_int("attention_mask", mask)
        if dims.uses_position_ids:
            self._bind_int("position_ids", position_ids(mask.astype(np.int64), t))
        media = self.media(ids.astype(np.int64))
        local = self._current_image(media)
        self._bind_int("media_index", media if local is None else (media > 0).astype(np.int64))
        keep = logits_index(t, all_positions)
        self._bind_int("logits_index", keep)
        keys = self.media_keys if local is None else dims.num_latents
        for name, buf in self.engine.cross.items():
            dec.set_input_shape(name, (b, dims.xattn_heads, keys, dims.xattn_dim_head))
            dec.set_address(name, buf.current if local is None else local[name])
        for i in range(dims.num_layers):
            for past_name, present_name in zip(past_names(i), present_names(i)):
                buf = self.engine.kv[past_name]
                dec.set_input_shape(past_name, (b, dims.num_kv_heads, past, dims.head_dim))
                dec.set_address(past_name, buf.current)
                dec.set_address(present_name, buf.spare)  # becomes the next piece's past
        item = dec.tensor_dtype("logits").itemsize
        logits_ptr = self.engine.logits_buffer(b * len(keep) * dims.vocab_size * item)
        dec.set_address("logits", logits_ptr)
        dec.execute()
        for buf in self.engine.kv.values():
            buf.flip()
        self.past_len = past + t
        return logits_ptr, len(keep)

    def _current_image(self, media: np.ndarray) -> dict[str, int] | None:
        """Device buffers holding each row's current image's K/V where every new token of a
        row attends to it (`current_image_offsets`), copied from the rows' K/V when a row's
        image changes; None: bind all images' K/V."""
        dims = self.dims
        offsets = current_image_offsets(media, self.media_keys, dims.num_latents)
        if offsets is None:
            return None
        current = tuple(int(o) for o in offsets)
        if self._local_offsets != current:
            dh, heads = dims.xattn_dim_head, dims.xattn_heads
            for name, buf in self.engine.cross.items():
                item = self.dec.tensor_dtype(name).itemsize
                block = dims.num_latents * dh * item  # one head's keys of one image
                for b, first in enumerate(current):
                    for h in range(b * heads, (b + 1) * heads):  # (row, head) pairs
                        src = buf.current + (h * self.media_keys + first) * dh * item
                        self.dev.copy(self.engine.cross_local[name] + h * block, src, block)
            self._local_offsets = current
        return self.engine.cross_local

    def _forward(self, ids: np.ndarray, mask: np.ndarray, all_positions: bool) -> np.ndarray:
        """Run ids (B, T) whose mask covers past + T; logits of the last (B, V) or of every new
        position (B, T, V). Advances the device KV cache."""
        self._check_active()
        b, t = ids.shape
        if b != self.batch:
            raise ValueError(f"batch {b} != the cache's batch {self.batch}")
        if mask.shape != (b, self.past_len + t):
            raise ValueError(
                f"attention_mask {mask.shape} must be (batch, past {self.past_len} + new {t})"
            )
        if self.past_len + t > self.max_seq_len:
            raise ValueError(
                f"{self.past_len + t} tokens exceed the engines' max_seq_len {self.max_seq_len} "
                "(rebuild with a larger --max-seq-len, up to the export's limit)"
            )
        logits_dtype = self.dec.tensor_dtype("logits")
        vocab, item = self.dims.vocab_size, logits_dtype.itemsize
        chunks = []
        done = 0
        for piece in self._pieces(self.past_len, t):
            end = self.past_len + piece.tokens
            ptr, n = self._run_piece(
                piece.profile, ids[:, done : done + piece.tokens], mask[:, :end], all_positions
            )
            done += piece.tokens
            if all_positions:
                out = np.empty((b, n, vocab), dtype=logits_dtype)
                self.dev.download(out, ptr)
                self.dev.synchronize()  # the next piece reuses the logits buffer
                chunks.append(out)
        if all_positions:
            return np.concatenate(chunks, axis=1).astype(np.float32)
        last = np.empty((b, vocab), dtype=logits_dtype)
        row = vocab * item
        self.dev.download_rows(last, ptr + (n - 1) * row, n * row, row, b)
        self.dev.synchronize()
        return last.astype(np.float32)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """All-position logits (N, T, V) for the new tokens; advances the cache."""
        ids = np.asarray(input_ids)
        return self._forward(ids, np.asarray(attention_mask), all_positions=True)

    def advance(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        """Run new tokens into the cache (last-position logits only, not read)."""
        self._forward(np.asarray(input_ids), np.asarray(attention_mask), all_positions=False)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """StepModel.step: last-position float32 logits. Leading ids already in the cache (the
        mask is longer than past + new) are skipped, as in OrtStepModel."""
        mask = np.asarray(attention_mask)
        new = mask.shape[1] - self.past_len
        if not 1 <= new <= input_ids.shape[1]:
            raise ValueError(
                f"attention mask of {mask.shape[1]} with {self.past_len} cached positions "
                f"leaves {new} new tokens, but {input_ids.shape[1]} ids were given"
            )
        logits = self._forward(np.asarray(input_ids)[:, -new:], mask, all_positions=False)
        if self.prefill_end is None:
            self.prefill_end = time.perf_counter()
        return logits

    def reorder_cache(self, index: np.ndarray) -> None:
        """new_row[i] = row[index[i]] for the KV and cross-attention buffers, on the device."""
        self._check_active()
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if len(index) == self.batch and np.array_equal(index, np.arange(self.batch)):
            return
        if index.size and (index.min() < 0 or index.max() >= self.batch):
            raise ValueError(f"reorder index out of range for batch {self.batch}")
        self._check_batch(len(index))
        dims, runs = self.dims, _runs(index)
        groups = (
            (self.engine.kv, dims.num_kv_heads * self.past_len * dims.head_dim),
            (self.engine.cross, dims.xattn_heads * self.media_keys * dims.xattn_dim_head),
        )
        for buffers, row_elems in groups:
            for name, buf in buffers.items():
                row = row_elems * self.dec.tensor_dtype(name).itemsize
                if row:
                    for dst, src, n in runs:
                        self.dev.copy(buf.spare + dst * row, buf.current + src * row, n * row)
                buf.flip()
        self.dev.synchronize()
        self.media.reorder(index)
        self.batch = len(index)
        self._local_offsets = None  # rows moved: the current-image K/V are copied again


def trt_pipeline(export_dir: str | Path, *, strict_device: bool = True, **kw: Any) -> Any:
    """A `runtime.pipeline.FlamingoPipeline` whose engine is a TrtFlamingo: same prompt checks,
    preprocessing, tokenizer, caches and search; limits are the engines' (<= the export's)."""
    from runtime.pipeline import FlamingoPipeline

    engine = kw.pop("engine", None) or TrtFlamingo(export_dir, strict_device=strict_device)
    return FlamingoPipeline(export_dir, engine=engine, **kw)
