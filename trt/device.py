"""The device layer under the TensorRT step model: device memory and engine execution.

Two small protocols, `Device` (memory on one stream; pointers are ints) and `Executor` (one
engine's execution context), are all that trt/engine.py needs of CUDA and TensorRT. Their real
implementations, `CudaDevice` (cuda-python: `cudaMalloc`, `cudaMemcpyAsync`,
`cudaMemcpy2DAsync`, `cudaStreamSynchronize`, `cudaGetDeviceProperties`) and `TrtExecutor`
(ICudaEngine/IExecutionContext name-based I/O: `get_tensor_dtype`, `set_input_shape`,
`set_tensor_address`, `set_optimization_profile_async`, `execute_async_v3`, all TensorRT >= 8.5;
one user-managed activation block: `create_execution_context(ExecutionContextAllocationStrategy
.USER_MANAGED)` + `set_device_memory` on 10.x, `create_execution_context_without_device_memory`
+ `device_memory` on 8.x), are written from the TensorRT Python API and CUDA runtime
documentation and not run in this repository; tests/trt/stand_in.py implements both protocols
with numpy and onnxruntime. tensorrt and cuda-python are imported only when asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from runtime.engines import DeviceInfo
from runtime.errors import FlamingoExportError


class TensorRTUnavailableError(FlamingoExportError, RuntimeError):
    """tensorrt (or cuda-python) cannot be imported here."""


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
