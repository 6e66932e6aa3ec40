"""Deployment targets in one table: memory, what the OS keeps, compute capability, TensorRT.

`plan` budgets memory against a target, `build` takes its workspace limit and records it in
engines.json; `default_trt` is the TensorRT its newest JetPack ships (what to `check`). The memory
numbers are assumptions stated here once (not measured in this repository): on Jetson the CPU
and GPU share one LPDDR5 pool, so the OS, the firmware carve-outs and the CUDA/TensorRT runtime
come out of the same bytes as the weights and the KV cache.

JetPack -> TensorRT (NVIDIA JetPack release notes): 5.1.x ships TensorRT 8.5.2 (CUDA 11.4),
6.0 ships 8.6.2 (CUDA 12.2), 6.1 and 6.2 ship 10.3 (CUDA 12.6). All Orin modules are compute
capability 8.7 (Ampere iGPU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from runtime.errors import FlamingoExportError

GiB = 1 << 30
MiB = 1 << 20

# The TensorRT ONNX parsers `check` knows (trt.parser_tables.RULES keys, oldest first): what
# JetPack 5.1 (8.5), 6.0 (8.6) and 6.1/6.2 (10.3) ship. Kept here, free of onnx, for the CLI.
TRT_VERSIONS: tuple[str, ...] = ("8.5", "8.6", "10")


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    memory_bytes: int  # physical memory the GPU can use (shared with the CPU on Jetson)
    os_reserve_bytes: int  # kept for the OS, firmware carve-outs, other processes
    runtime_overhead_bytes: int  # CUDA context, TensorRT/cuBLAS kernels, Python + tokenizer
    workspace_bytes: int  # default TensorRT workspace (tactic scratch) limit for `build`
    compute_capability: str | None  # None: whatever GPU `build` runs on
    jetpacks: tuple[str, ...]  # JetPack releases for this board ("" for x86)
    default_trt: str  # trt.parser_tables.RULES key `check` uses by default for this target
    bandwidth_gb_s: float  # DRAM bandwidth: bounds memory-bound decode (tokens/s)
    shared_memory: bool  # CPU and GPU share the DRAM (engine load peaks count twice)
    reserve_note: str

    @property
    def usable_bytes(self) -> int:
        """What the model (weights, caches, activations) and its runtime may use."""
        return self.memory_bytes - self.os_reserve_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["usable_bytes"] = self.usable_bytes
        return d


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            name="orin-nano-8gb",
            description="Jetson Orin Nano 8GB (1024-core Ampere iGPU, 8 GB LPDDR5 shared)",
            memory_bytes=8 * GiB,
            os_reserve_bytes=3 * GiB // 2,
            runtime_overhead_bytes=768 * MiB,
            workspace_bytes=512 * MiB,
            compute_capability="8.7",
            jetpacks=("5.1.x", "6.0", "6.1", "6.2"),
            default_trt="10",
            bandwidth_gb_s=68.0,
            shared_memory=True,
            reserve_note=(
                "1.5 GiB: firmware carve-outs + headless Ubuntu + JetPack services; a desktop "
                "session needs about 1 GiB more (boot to multi-user.target)"
            ),
        ),
        Target(
            name="orin-agx-64gb",
            description="Jetson AGX Orin 64GB (2048-core Ampere iGPU, 64 GB LPDDR5 shared)",
            memory_bytes=64 * GiB,
            os_reserve_bytes=4 * GiB,
            runtime_overhead_bytes=1 * GiB,
            workspace_bytes=2 * GiB,
            compute_capability="8.7",
            jetpacks=("5.1.x", "6.0", "6.1", "6.2"),
            default_trt="10",
            bandwidth_gb_s=204.8,
            shared_memory=True,
            reserve_note="4 GiB: firmware carve-outs + Ubuntu with desktop + JetPack services",
        ),
        Target(
            name="x86-gpu",
            description="x86-64 host with a 24 GB discrete NVIDIA GPU (RTX 3090/4090, A10, L4)",
            memory_bytes=24 * GiB,
            os_reserve_bytes=GiB // 2,
            runtime_overhead_bytes=1 * GiB,
            workspace_bytes=4 * GiB,
            compute_capability=None,
            jetpacks=(),
            default_trt="10",
            bandwidth_gb_s=600.0,
            shared_memory=False,
            reserve_note="0.5 GiB: driver, display and ECC/reserved memory of a discrete GPU",
        ),
    )
}


class TargetError(FlamingoExportError, ValueError):
    """Unknown target name."""


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise TargetError(f"unknown target {name!r} (known: {', '.join(TARGETS)})") from None
