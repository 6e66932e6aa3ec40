"""Per-step bookkeeping that every decoder backend shares (numpy only).

The media-location rule and the position ids are computed outside the graphs, once, here: the
PyTorch reference's step model and the onnxruntime/TensorRT sessions all call these, so the
backends can differ only in how they compute logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .spec import ModelDims, cross_attn_names


class MediaCounter:
    """Which image each new token attends to, carried across prefill and decode steps.

    A token's media index is the 1-based number of the latest `<image>` at or before it
    (0 = before the first image: no cross-attention), counted with integer ops. Counting goes on
    across steps, so every generated token attends to the prompt's last image, as OpenFlamingo's
    cached-media generation does. Indices are capped at the row's image count so a generated
    `<image>` token keeps attending to the last real image instead of to nothing.
    """

    def __init__(self, media_token_id: int, num_images: np.ndarray) -> None:
        self.media_token_id = media_token_id
        self.num_images = np.asarray(num_images, dtype=np.int64)
        self.count = np.zeros_like(self.num_images)

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        step = np.cumsum(input_ids == self.media_token_id, axis=-1, dtype=np.int64)
        index = np.minimum(self.count[:, None] + step, self.num_images[:, None])
        self.count = index[:, -1].copy()
        return index

    def reorder(self, index: np.ndarray) -> None:
        self.count = self.count[index]
        self.num_images = self.num_images[index]


def position_ids(attention_mask: np.ndarray, num_new: int) -> np.ndarray:
    """HF's rule under left padding: cumsum(mask) - 1 with pads at 1; the last num_new columns."""
    pos = np.cumsum(attention_mask, axis=-1, dtype=np.int64) - 1
    pos[attention_mask == 0] = 1
    return pos[:, -num_new:]


def logits_index(num_new: int, all_positions: bool) -> np.ndarray:
    """The decoder's `logits_index`: every new position, or the last one only (generation
    reads nothing else; rows are left-padded, so the last column is every row's last token)."""
    if all_positions:
        return np.arange(num_new, dtype=np.int64)
    return np.array([num_new - 1], dtype=np.int64)


def current_image_offsets(
    media_index: np.ndarray, media_keys: int, num_latents: int
) -> np.ndarray | None:
    """Per row, the first key of the image every new token attends to, or None.

    Applies when every new token of a row attends to one image (each decode step; text after
    a row's last image): the other images' keys get exactly zero weight under the media mask,
    so attending to the current image's `num_latents` keys alone (media index 1, or 0 where a
    row has no image yet) computes the same outputs without reading and masking
    (images - 1) x num_latents keys per cross-attention layer and step. None where a row's new
    tokens span images (a prefill) or there is one image per row already.
    """
    if media_keys <= num_latents or not (media_index == media_index[:, :1]).all():
        return None
    return np.maximum(media_index[:, 0] - 1, 0) * num_latents


def current_image_kv(
    cross_kv: dict[str, np.ndarray], offsets: Sequence[int], num_latents: int
) -> dict[str, np.ndarray]:
    """Cross-attention K/V (B, H, num_latents, Dh) of each row's current image, from the
    rows' K/V and `current_image_offsets`."""
    return {
        name: np.stack([kv[b, :, s : s + num_latents] for b, s in enumerate(offsets)])
        for name, kv in cross_kv.items()
    }


def rows_cross_kv(
    features: dict[str, np.ndarray],
    rows: Sequence[Sequence[int]],
    dims: ModelDims,
    dtype: np.dtype,
) -> dict[str, np.ndarray]:
    """Per-row cross-attention K/V for the decoder: row b attends over images rows[b] (indices
    into the vision batch), concatenated in order and zero-padded to the longest row, in the
    decoder's dtype (the vision graph may run at another precision)."""
    most = max(1, max(len(r) for r in rows))
    latents = dims.num_latents
    out = {}
    for j in dims.xattn_layers:
        for name in cross_attn_names(j):
            per_image = features[name]  # (N, H, L, Dh)
            _, h, _, dh = per_image.shape
            buf = np.zeros((len(rows), h, most * latents, dh), dtype=dtype)
            for b, images in enumerate(rows):
                for slot, i in enumerate(images):
                    buf[b, :, slot * latents : (slot + 1) * latents] = per_image[i]
            out[name] = buf
    return out


class RowsCrossKV:
    """`rows_cross_kv` as a method of an engine that has `dims` and `float_dtype` (the
    onnxruntime and TensorRT engines both)."""

    dims: ModelDims
    float_dtype: np.dtype

    def rows_cross_kv(
        self, features: dict[str, np.ndarray], rows: Sequence[Sequence[int]]
    ) -> dict[str, np.ndarray]:
        """Per-row cross-attention K/V (see `rows_cross_kv`)."""
        return rows_cross_kv(features, rows, self.dims, self.float_dtype)
