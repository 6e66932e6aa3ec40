"""Stand-ins for CUDA and TensorRT, so the TensorRT step model runs without a GPU.

`HostDevice` implements trt.device.Device with numpy (same pointer arithmetic, bounds-checked)
and `OrtExecutor` implements trt.device.Executor with onnxruntime computing on that memory;
`fake_build` writes placeholder engines and a valid engines.json into a copy of an export, and
`stand_in_engine` builds a TrtFlamingo over both stand-ins from such a folder. Only tests use
them.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.engine import OnnxFlamingo
from runtime.engines import DeviceInfo, EngineEntry, load_engines_manifest
from runtime.manifest import load_manifest
from trt.build import engines_manifest, make_build_plan
from trt.engine import TrtFlamingo

DEVICE = DeviceInfo("Stand-in GPU", "8.7")  # what fake_build records as the build's GPU


class HostDevice:
    """Numpy stand-in for a CUDA device: same pointer arithmetic, bounds-checked.

    Lets the step model's buffer protocol (ping-pong KV, row copies, strided logits) be tested
    without a GPU, with an Executor that computes on the host (`OrtExecutor`).
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


class OrtExecutor:
    """Executor with TensorRT's contract, computing with onnxruntime on HostDevice memory.

    Like TensorRT 8.x it binds int64 inputs as int32, and it refuses shapes outside the active
    optimization profile (from engines.json), so a wrong profile choice fails here too.
    """

    def __init__(self, session, device: HostDevice, entry: EngineEntry, spec) -> None:
        self.session, self.device, self.entry = session, device, entry
        self.spec_dtypes = {t.name: np.dtype(t.dtype) for t in (*spec.inputs, *spec.outputs)}
        self.bound = {n: (np.int32 if d == np.int64 else d) for n, d in self.spec_dtypes.items()}
        self.inputs = spec.input_names
        self.profile = 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.calls: Counter[str] = Counter()

    def tensor_dtype(self, name: str) -> np.dtype:
        return np.dtype(self.bound[name])

    def set_profile(self, index: int) -> None:
        self.profile = index

    def set_input_shape(self, name: str, shape: Sequence[int]) -> None:
        lo, _, hi = self.entry.profiles[self.profile]["shapes"][name]
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            raise ValueError(f"{name} {tuple(shape)} outside profile {self.profile} [{lo}, {hi}]")
        self.shapes[name] = tuple(shape)

    def set_address(self, name: str, ptr: int) -> None:
        self.addresses[name] = ptr

    def execute(self) -> None:
        feed = {}
        for name in self.inputs:
            dtype, shape = self.tensor_dtype(name), self.shapes[name]
            nbytes = int(np.prod(shape)) * dtype.itemsize
            raw = self.device.view(self.addresses[name], nbytes).view(dtype).reshape(shape)
            feed[name] = raw.astype(self.spec_dtypes[name])
        outputs = self.session.run(None, feed)
        for o, value in zip(self.session.get_outputs(), outputs):
            self.device.upload(self.addresses[o.name], value.astype(self.bound[o.name]))
        self.calls[self.entry.profiles[self.profile]["name"]] += 1


def stand_in_engine(export_dir: Path) -> TrtFlamingo:
    """A TrtFlamingo over an export with engines.json, onnxruntime computing for TensorRT."""
    ort_engine = OnnxFlamingo(export_dir)
    device = HostDevice()
    engines = load_engines_manifest(export_dir)
    graphs = ort_engine.manifest.graphs
    executors = {
        g: OrtExecutor(ort_engine.sessions[g], device, engines.engines[g], graphs[g].spec)
        for g in ("vision", "decoder")
    }
    return TrtFlamingo(export_dir, device=device, executors=executors)


def fake_build(src: Path, dst: Path, **limits: int) -> Path:
    """A copy of an export with placeholder engine files and a valid engines.json."""
    shutil.copytree(src, dst)
    manifest = load_manifest(dst)
    plan = make_build_plan(manifest, "orin-nano-8gb", **limits)
    for name in ("vision.engine", "decoder.engine"):
        (dst / name).write_bytes(b"placeholder engine " + name.encode())
    engines = engines_manifest(
        dst, manifest, plan, tensorrt_version="10.3.0", device=DEVICE, strongly_typed=True
    )
    engines.write(dst)
    return dst
