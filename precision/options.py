"""What `quantize` and `export --precision` are asked: QuantizeOptions (validated once),
QuantizeError, the calibration cache check."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from exporter.export import (
    ExportError,
)
from runtime.manifest import PRECISIONS
from runtime.schema import load_json

Progress = Callable[[str], None]

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
INT4_FORMATS = ("qdq", "matmulnbits")
INT8_MODES = ("w8a8", "weight-only", "dynamic")
BLOCK_SIZES = (32, 64, 128)
FP16_KEEP_CHOICES = ("norm", "softmax", "logits")
# What stays fp32 in fp16 graphs by default: norm statistics only (docs/measurements.md).
DEFAULT_FP16_KEEP = ("norm",)
INT4_OPSET = 21  # blocked DequantizeLinear and INT4 tensors
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
# Ops that only move or reshape a tensor: walked through from `logits` back to its MatMul.
_LAYOUT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Cast")


class QuantizeError(ExportError):
    """The quantization cannot proceed (bad option, unsuitable source, rule violation, ...)."""


@dataclass
class QuantizeOptions:
    """Per-graph precision and how to get there; recorded in the output manifest."""

    vision: str = "fp16"
    decoder: str = "fp16"
    calibration: str = "random"  # DATA path | random | demo (int8 only)
    method: str = "minmax"
    percentile: float = 99.999
    episodes: int = 16
    max_shots: int = 2
    decode_steps: int = 8
    seed: int = 0
    block_size: int = 128  # the field's default group (AWQ/GPTQ, MatMulNBits, ModelOpt)
    int4_format: str = "qdq"
    int8_mode: str = "w8a8"
    fp16_keep: tuple[str, ...] = DEFAULT_FP16_KEEP
    keep_nodes: tuple[str, ...] = ()  # node-name globs kept at the source precision
    quantize_embeddings: bool = True
    calibration_cache: str | None = None  # int8 ranges: reused if `<cache>.<graph>.json` exists
    force: bool = False

    def precision(self, graph: str) -> str:
        return {"vision": self.vision, "decoder": self.decoder}[graph]

    def validate(self) -> None:
        for name, p in (("vision", self.vision), ("decoder", self.decoder)):
            if p not in PRECISIONS:
                raise QuantizeError(f"{name} precision {p!r} is not one of {list(PRECISIONS)}")
        if self.method not in CALIBRATION_METHODS:
            raise QuantizeError(
                f"calibration method {self.method!r} is not one of {list(CALIBRATION_METHODS)}"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise QuantizeError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.block_size not in BLOCK_SIZES:
            raise QuantizeError(
                f"int4 block size must be one of {BLOCK_SIZES}, got {self.block_size}"
            )
        if self.int4_format not in INT4_FORMATS:
            raise QuantizeError(f"int4 format {self.int4_format!r} is not one of {INT4_FORMATS}")
        if self.int8_mode not in INT8_MODES:
            raise QuantizeError(f"int8 mode {self.int8_mode!r} is not one of {INT8_MODES}")
        bad = [k for k in self.fp16_keep if k not in FP16_KEEP_CHOICES]
        if bad:
            raise QuantizeError(f"fp16 keep {bad} not among {list(FP16_KEEP_CHOICES)}")
        if self.episodes < 1:
            raise QuantizeError(f"the calibration set is empty: {self.episodes} episodes asked")
        if self.decode_steps < 0 or self.max_shots < 0:
            raise QuantizeError("decode steps and max shots must be >= 0")
        for graph in ("vision", "decoder"):
            cache = self.cache_file(graph)
            if cache is not None and (cache.exists() or cache.is_symlink()):
                check_calibration_cache(cache)
        # options that would be silently ignored contradict the precision asked for
        if self.keep_nodes and self.vision == self.decoder == "fp32":
            raise QuantizeError("--keep-node keeps nodes out of a reduced precision: give one")

    def cache_file(self, graph: str) -> Path | None:
        """`<calibration_cache>.<graph>.json` where the graph is calibrated (W8A8 int8)."""
        calibrated = self.precision(graph) == "int8" and self.int8_mode == "w8a8"
        if not calibrated or not self.calibration_cache:
            return None
        return Path(f"{self.calibration_cache}.{graph}.json")


RECALIBRATE = "delete it to recalibrate"


def check_calibration_cache(path: Path) -> None:
    """A calibration cache that exists must be a JSON object file (onnxruntime's tensor ranges)."""
    if not path.is_file():
        raise QuantizeError(
            f"{path}: not a file; a calibration cache is a JSON file ({RECALIBRATE})"
        )
    data = load_json(path, QuantizeError)
    if not isinstance(data, dict):
        raise QuantizeError(
            f"{path}: not a calibration cache (expected a JSON object of tensor ranges; "
            f"{RECALIBRATE})"
        )
