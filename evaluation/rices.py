"""RICES: retrieval-based in-context example selection (`open_flamingo/eval/rices.py`).

Every train record's image gets an L2-normalized feature; a query takes the `k` train records
of highest cosine similarity, the most similar last in the prompt. Ties go to the lower train
index (numpy's stable sort; torch's descending argsort does not document its tie order).

Features, as chosen by `--rices-vision`:

* `export` (default): the export's own vision graph, `image_latents` averaged over the
  resampler's latents (the export has no CLIP projection head). Torch-free. With several
  exports, the first one's features choose the demonstrations of all, so they see the same.
* a CLIP model file (open_clip state dict or HF CLIP folder): its `encode_image` (the pooled,
  projected embedding of the class token), as OpenFlamingo's RICES computes with open_clip
  (ViT-L-14 openai in its defaults); computed by our PyTorch ViT (`flamingo.model`), so this
  path needs the `export` extra.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.images import PreprocessConfig, preprocess

from .tasks import EvaluationError

__all__ = ["FeatureSource", "Retriever", "clip_features", "export_features"]


@dataclass
class FeatureSource:
    """Images -> L2-normalized features: a preprocessing and an encoder of pixels
    (N, 3, S, S) -> (N, D)."""

    preprocess_config: PreprocessConfig
    encode_pixels: Callable[[np.ndarray], np.ndarray]
    batch_size: int = 16

    def __call__(self, images: Sequence[Any]) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = preprocess(list(images[start : start + self.batch_size]),
                                self.preprocess_config)  # fmt: skip
            out.append(np.asarray(self.encode_pixels(pixels), dtype=np.float32))
        x = np.concatenate(out)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)


def export_features(pipe: Any) -> FeatureSource:
    """The mean resampler latent of `pipe`'s export (its vision graph's `image_latents`)."""

    def encode(pixels: np.ndarray) -> np.ndarray:
        return np.asarray(pipe.engine.encode_images(pixels)["image_latents"]).mean(axis=1)

    return FeatureSource(pipe.preprocess_config, encode)


def clip_features(path: str | Path) -> FeatureSource:
    """CLIP `encode_image` of an open_clip state dict or HF CLIP folder (PyTorch, loaded by
    flamingo.loaders), with the open_clip eval preprocessing at its image size."""
    import torch

    from flamingo.loaders import read_vision
    from flamingo.model import VisionTransformer

    cfg, state = read_vision(Path(path))
    model = VisionTransformer(cfg)
    missing = model.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise EvaluationError(f"{path}: CLIP vision tensors missing, e.g. {missing[0]!r}")
    model.eval()

    @torch.no_grad()
    def encode(pixels: np.ndarray) -> np.ndarray:
        pooled, _ = model(torch.from_numpy(pixels))
        return pooled.float().numpy()

    return FeatureSource(PreprocessConfig(image_size=cfg.image_size), encode)


class Retriever:
    """Nearest train records by image feature (RICES.find)."""

    def __init__(self, features: FeatureSource, train_images: Sequence[Any]) -> None:
        self.features = features
        self.train = features(train_images)  # (N_train, D)

    def find(self, images: Sequence[Any], k: int) -> list[list[int]]:
        """Per query image, the train indices of its `k` most similar records, most similar
        last; EvaluationError when there are fewer than `k` train records (as a random draw
        of more demonstrations than the query set holds)."""
        if k > len(self.train):
            raise EvaluationError(
                f"{k} demonstrations cannot be chosen by RICES from {len(self.train)} train records"
            )
        similarity = self.features(images) @ self.train.T  # (B, N_train)
        best = np.argsort(-similarity, axis=-1, kind="stable")[:, :k]
        return [[int(i) for i in reversed(row)] for row in best]
