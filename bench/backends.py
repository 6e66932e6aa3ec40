"""The backends a bench run times side by side: the export on the runtime, our PyTorch reference
and the published open_flamingo `generate`, each returning one `Sample` per run; and the RSS
meter (Linux /proc) behind the memory figures. Times in ms, memory in bytes."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------------ memory


class RssMeter:
    """Resident memory of this process from /proc (Linux); zeros elsewhere."""

    def __init__(self) -> None:
        self.resettable = True

    @staticmethod
    def _status(key: str) -> int:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def current(self) -> int:
        return self._status("VmRSS")

    def peak(self) -> int:
        return self._status("VmHWM")

    def reset_peak(self) -> None:
        """Set the high-water mark to the current RSS (so a run's own peak can be read)."""
        if not self.resettable:
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.resettable = False  # then peaks are the process's running maximum


# ------------------------------------------------------------------------------------ backends


@dataclass
class Sample:
    """One timed generation."""

    vision_ms: float
    prefill_ms: float
    decode_ms: float
    total_ms: float
    new_tokens: int
    prompt_tokens: int
    images: int
    images_encoded: int
    cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    work_rss_bytes: int = 0  # high-water mark during the run minus RSS at its start
    peak_rss_bytes: int = 0  # estimated peak had the backend run alone (docs/bench.md)


class RuntimeBackend:
    """The export under onnxruntime (FlamingoPipeline), with its caches on or off per call."""

    name = "runtime"

    def __init__(
        self, export_dir: Path, threads: int, new_tokens: int, allow_spinning: bool = True
    ) -> None:
        from runtime.pipeline import FlamingoPipeline

        self.pipe = FlamingoPipeline(export_dir, threads=threads, allow_spinning=allow_spinning)
        self.config = self.pipe.default_config(max_new_tokens=new_tokens, eos_token_ids=())
        self.media_token_id = self.pipe.engine.media_token_id

    def encode(self, prompt: str) -> list[int]:
        return self.pipe.token_ids(prompt).tolist()

    def run(self, prompt: str, images: Sequence[np.ndarray], cached: bool) -> Sample:
        self.pipe.use_prefix_cache = cached
        self.pipe.use_vision_cache = cached
        out = self.pipe.generate(prompt, images, self.config)
        t = out.timings_ms
        cached_tokens = out.stats["cached_tokens"]
        ids = self.encode(prompt)
        reused_images = sum(1 for i in ids[:cached_tokens] if i == self.media_token_id)
        return Sample(
            vision_ms=t["vision"],
            prefill_ms=t["prefill"],
            decode_ms=t["decode"],
            total_ms=t["total"],
            new_tokens=len(out.token_ids),
            prompt_tokens=out.stats["prompt_tokens"],
            images=len(images),
            images_encoded=len(images) - reused_images,
            cached_tokens=cached_tokens,
            token_ids=list(out.token_ids),
        )


class ReferenceBackend:
    """Our PyTorch reference: flamingo.model under the shared numpy search (flamingo.generate)."""

    name = "reference"

    def __init__(self, model: Any, runtime: RuntimeBackend, new_tokens: int) -> None:
        from runtime.generation import GenerationConfig

        self.model = model
        self.runtime = runtime  # tokenizer and preprocessing of the export (same ids, pixels)
        self.config = GenerationConfig(
            max_new_tokens=new_tokens, eos_token_ids=(), pad_token_id=model.cfg.pad_token_id
        )

    def run(self, prompt: str, images: Sequence[np.ndarray], cached: bool) -> Sample:
        import torch

        from flamingo.generate import TorchStepModel
        from runtime.generation import generate as search
        from runtime.images import preprocess

        start = time.perf_counter()
        with torch.inference_mode():
            ids = np.array([self.runtime.encode(prompt)], dtype=np.int64)
            pixels = preprocess(images, self.runtime.pipe.preprocess_config)
            vision_x = torch.from_numpy(pixels)[None, :, None]
            step = TorchStepModel(self.model, vision_x, np.array([len(images)]))
            vision_end = time.perf_counter()
            result = search(step, ids, np.ones_like(ids), self.config)
        end = time.perf_counter()
        prefill_end = step.prefill_end or end
        return Sample(
            vision_ms=(vision_end - start) * 1e3,
            prefill_ms=(prefill_end - vision_end) * 1e3,
            decode_ms=(end - prefill_end) * 1e3,
            total_ms=(end - start) * 1e3,
            new_tokens=len(result.sequences[0]),
            prompt_tokens=ids.shape[1],
            images=len(images),
            images_encoded=len(images),
            token_ids=list(result.sequences[0]),
        )


class OracleBackend:
    """The published open_flamingo `Flamingo.generate` (HF generate, greedy, use_cache=True)."""

    name = "oracle"

    def __init__(self, model: Any, pad_token_id: int, runtime: RuntimeBackend, n: int) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.runtime = runtime
        self.new_tokens = n
        self._marks: list[float] = []
        lm = model.lang_encoder
        lm.register_forward_pre_hook(lambda *_: self._marks.append(time.perf_counter()))
        lm.register_forward_hook(lambda *_: self._marks.append(time.perf_counter()))

    def run(self, prompt: str, images: Sequence[np.ndarray], cached: bool) -> Sample:
        import torch

        from runtime.images import preprocess

        self._marks.clear()
        start = time.perf_counter()
        with torch.inference_mode():
            ids = torch.tensor([self.runtime.encode(prompt)], dtype=torch.int64)
            pixels = preprocess(images, self.runtime.pipe.preprocess_config)
            vision_x = torch.from_numpy(pixels)[None, :, None]
            out = self.model.generate(
                vision_x,
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.new_tokens,
                min_new_tokens=self.new_tokens,
                eos_token_id=None,  # the stop token is disabled for timing
                pad_token_id=self.pad_token_id,
                do_sample=False,
                num_beams=1,
                use_cache=True,
            )
        end = time.perf_counter()
        # marks: [LM forward start, end] per step; before the first: vision (+ HF setup)
        vision_end = self._marks[0] if self._marks else end
        prefill_end = self._marks[1] if len(self._marks) > 1 else end
        new = out[0, ids.shape[1] :].tolist()
        return Sample(
            vision_ms=(vision_end - start) * 1e3,
            prefill_ms=(prefill_end - vision_end) * 1e3,
            decode_ms=(end - prefill_end) * 1e3,
            total_ms=(end - start) * 1e3,
            new_tokens=len(new),
            prompt_tokens=ids.shape[1],
            images=len(images),
            images_encoded=len(images),
            token_ids=new,
        )


@contextmanager
def quiet_frameworks(hf: bool) -> Any:
    """HF generate warns on every call about flags it ignores; keep the output readable.

    transformers is touched only when a baseline needs it (the runtime-only bench never
    imports it, so its memory numbers stay those of the torch-free runtime).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not hf:
            yield
            return
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
