"""Prompt in, text out: tokenizer + image preprocessing + the two graphs + the shared search.

Torch-free (numpy, onnxruntime, tokenizers, Pillow). One prompt with `<image>` markers and its
images per call; batching, prefix caching and streaming build on this in later steps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from .engine import DEFAULT_PROVIDERS, OnnxFlamingo
from .generation import GenerationConfig, generate
from .images import ImageInput, PreprocessConfig, preprocess
from .prompts import check_images_match


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "logprobs": self.logprobs,
            "timings_ms": self.timings_ms,
        }


class FlamingoPipeline:
    def __init__(
        self,
        export_dir: str | Path,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        threads: int | None = None,
    ) -> None:
        self.engine = OnnxFlamingo(export_dir, providers, threads)
        self.tokenizer = Tokenizer.from_file(str(self.engine.root / "tokenizer" / "tokenizer.json"))
        self.preprocess_config = PreprocessConfig.from_dict(self.engine.manifest.preprocess)
        self.max_seq_len = self.engine.manifest.limits["max_seq_len"]
        self.max_images = self.engine.manifest.limits["max_images"]

    def generate(
        self,
        prompt: str,
        images: Sequence[ImageInput],
        config: GenerationConfig | None = None,
    ) -> Generation:
        """Greedy/beam/sampled continuation of an interleaved prompt (OpenFlamingo semantics)."""
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        check_images_match(prompt, len(images))
        if len(images) > self.max_images:
            raise ValueError(
                f"{len(images)} images exceed this export's limit of {self.max_images}"
            )
        config = config or GenerationConfig(
            eos_token_ids=(self.engine.eoc_token_id,), pad_token_id=self.engine.pad_token_id
        )
        ids = np.array([self.tokenizer.encode(prompt).ids], dtype=np.int64)
        if ids.shape[1] + config.max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt of {ids.shape[1]} tokens + {config.max_new_tokens} new tokens exceeds "
                f"the exported maximum context of {self.max_seq_len}"
            )
        timings: dict[str, float] = {}
        start = time.perf_counter()
        if images:
            features = self.engine.encode_images(preprocess(list(images), self.preprocess_config))
            cross_kv = self.engine.rows_cross_kv(features, [list(range(len(images)))])
        else:
            cross_kv = self._empty_cross_kv()
        timings["vision"] = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        step_model = self.engine.step_model(cross_kv, np.array([len(images)]))
        result = generate(step_model, ids, np.ones_like(ids), config)
        timings["generate"] = (time.perf_counter() - start) * 1e3
        tokens = result.sequences[0]
        text_ids = [t for t in tokens if t not in config.eos_token_ids]
        return Generation(
            text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
            token_ids=tokens,
            logprobs=result.logprobs[0],
            timings_ms=timings,
        )

    def _empty_cross_kv(self) -> dict[str, np.ndarray]:
        """Text-only prompts: one all-zero image slot that no token attends to."""
        dims = self.engine.dims
        shape = (1, dims.xattn_heads, dims.num_latents, dims.xattn_dim_head)
        zeros = np.zeros(shape, dtype=self.engine.float_dtype)
        names = self.engine.decoder_spec.input_names
        return {name: zeros for name in names if name.startswith("cross_attn.")}
