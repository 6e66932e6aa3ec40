"""Graph inputs for calibration, produced by running the fp32 export on calibration episodes.

Decoder activations depend on the KV cache, so calibrating on prefill alone would miss the
decode steps the runtime spends most of its time in. Each episode is run the way the runtime
runs it: the vision graph on its images, the decoder prefill on the whole prompt, then greedy
decode steps, each fed the fp32 runtime's own past KV. The decoder session is wrapped to record
exactly what the runtime feeds it (media index, position ids, cross-attention K/V, past KV), so
calibration sees the runtime's real inputs.

Feeds are generated lazily, one at a time: the calibrator never holds more than one step's KV.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from runtime.engine import OnnxFlamingo, ort_session_factory
from runtime.images import PreprocessConfig
from runtime.tokenizer import load_export_tokenizer
from runtime.video import encode_media, preprocess_media

from .data import CalibrationError, Episode

Feed = dict[str, np.ndarray]
Progress = Callable[[str], None]


class _RecordingSession:
    """An InferenceSession wrapper that keeps every feed it is given while `recording`."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.feeds: list[Feed] = []
        self.recording = False

    def run(self, output_names: Any, feed: Feed, *args: Any) -> Any:
        if self.recording:
            self.feeds.append(dict(feed))
        return self._session.run(output_names, feed, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class EpisodeRunner:
    """Runs calibration episodes through an fp32 export and yields each graph's feeds."""

    def __init__(self, export_dir: Any, decode_steps: int = 8, image_batch: int = 4) -> None:
        if decode_steps < 0:
            raise CalibrationError(f"decode_steps must be >= 0, got {decode_steps}")
        self._make_session = ort_session_factory()
        self._recorder: _RecordingSession | None = None
        self.engine = OnnxFlamingo(export_dir, verify_hashes=False, session_factory=self._session)
        self.tokenizer = load_export_tokenizer(self.engine.root, self.engine.manifest)
        self.preprocess = PreprocessConfig.from_dict(self.engine.manifest.preprocess)
        self.decode_steps = decode_steps
        self.image_batch = image_batch
        self._pixels: dict[int, list[np.ndarray]] = {}

    def _session(self, name: str, path: Path) -> Any:
        """onnxruntime's session; the decoder's wrapped to record what the runtime feeds it."""
        session = self._make_session(name, path)
        if name == "decoder":
            self._recorder = session = _RecordingSession(session)
        return session

    def pixels(self, episode: Episode) -> list[np.ndarray]:
        """Each media item's frames (F, 3, S, S), as the runtime preprocesses them."""
        key = id(episode)
        if key not in self._pixels:
            max_frames = self.engine.limits["max_frames"]
            self._pixels[key] = preprocess_media(list(episode.images), self.preprocess, max_frames)
        return self._pixels[key]

    def vision_feeds(self, episodes: list[Episode]) -> Iterator[Feed]:
        """pixel_values batches of up to `image_batch` media items of one frame count, every
        episode's media once."""
        dtype = np.dtype(self.engine.vision_spec.inputs[0].dtype)
        pending: dict[int, list[np.ndarray]] = {}
        for episode in episodes:
            for px in self.pixels(episode):
                batch = pending.setdefault(len(px), [])
                batch.append(px)
                if len(batch) == self.image_batch:
                    yield {"pixel_values": np.stack(batch).astype(dtype)}
                    batch.clear()
        for batch in pending.values():
            if batch:
                yield {"pixel_values": np.stack(batch).astype(dtype)}

    def decoder_feeds(self, episodes: list[Episode]) -> Iterator[Feed]:
        """Prefill + `decode_steps` greedy steps per episode, batch 1, real KV states."""
        engine, recorder = self.engine, self._recorder
        assert recorder is not None
        recorder.feeds, recorder.recording = [], True
        try:
            for episode in episodes:
                px = self.pixels(episode)
                n = len(px)
                # text-only prompt: one all-zero image slot, never attended
                features = encode_media(engine.encode_images, px) if px else {}
                rows_kv = engine.rows_cross_kv(features, [list(range(n))])
                ids = np.array([self.tokenizer.encode(episode.prompt).ids], dtype=np.int64)
                model = engine.step_model(rows_kv, np.array([n]), io_binding=False)
                mask = np.ones_like(ids)
                logits = model.step(ids, mask)
                yield from self._drain(recorder)
                for _ in range(self.decode_steps):
                    nxt = logits.argmax(-1)[:, None].astype(np.int64)
                    mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
                    logits = model.step(nxt, mask)
                    yield from self._drain(recorder)
        finally:
            recorder.recording = False

    @staticmethod
    def _drain(recorder: _RecordingSession) -> Iterator[Feed]:
        feeds, recorder.feeds = recorder.feeds, []
        yield from feeds


class FeedReader(CalibrationDataReader):
    """onnxruntime CalibrationDataReader over a restartable feed generator, with progress.

    `set_range` serves onnxruntime's strided calibration (`CalibStridedMinMax`), which the
    quantizer uses to collect statistics one feed at a time: that keeps memory at one feed's
    activations and sidesteps the histogram calibrators' stacking of differently shaped
    arrays (prefill and decode steps have different sequence lengths). `total` must be exact.
    """

    def __init__(
        self,
        make: Callable[[], Iterator[Feed]],
        label: str,
        total: int,
        progress: Progress | None = None,
        every: int = 10,
    ) -> None:
        self.make = make
        self.label = label
        self.total = total
        self.progress = progress
        self.every = every
        self.position = 0  # feeds taken from the generator so far
        self.stop: int | None = None
        self._it: Iterator[Feed] | None = None

    def _restart(self) -> None:
        self._it = self.make()
        self.position = 0

    def set_range(self, start_index: int, end_index: int) -> None:
        if self._it is None or start_index < self.position:
            self._restart()
        while self.position < start_index:
            self._take()
        self.stop = end_index

    def _take(self) -> Feed | None:
        assert self._it is not None
        feed = next(self._it, None)
        if feed is None:
            if self.position == 0:
                raise CalibrationError(f"calibration produced no {self.label} inputs")
            return None
        self.position += 1
        if self.progress is not None and (
            self.position % self.every == 0 or self.position == self.total
        ):
            self.progress(f"calibrating {self.label}: {self.position}/{self.total} inputs")
        return feed

    def get_next(self) -> Feed | None:
        if self._it is None:
            self._restart()
        if self.stop is not None and self.position >= self.stop:
            return None
        return self._take()

    def rewind(self) -> None:
        self._it = None
        self.stop = None

    def __len__(self) -> int:
        return self.total
