"""Calibration for quantized exports: few-shot calibration sets (`data`), graph inputs produced
by running the fp32 export on them (`collect`), and per-layer sensitivity (`sensitivity`).

Kept apart from `runtime/` (which must stay small and torch-free on devices) because only the
exporter machine quantizes.
"""
